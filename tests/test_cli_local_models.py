"""``autoselect-fast generate`` and ``show`` end to end on tiny random-weight checkpoints saved to disk
(``tests/tiny_checkpoints.py``), their input checks, and the adapters' token-to-region maps.

The unpruned answer of ``generate`` is compared with transformers' own ``model.generate`` on the
processor's inputs: that checks the whole path (chat template, tokenizer, image processor, engine).
"""
import json
import os
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from tiny_checkpoints import save_llava, save_llava_next, save_picture, save_qwen2_5_vl, save_scorer  # noqa: E402

from autoselect_fast import cli, local_checkpoint, show  # noqa: E402
from autoselect_fast.local_checkpoint import open_checkpoint  # noqa: E402

COLOUR = (200, 160, 120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_models")
    return {
        "llava": save_llava(str(root / "llava")),  # N = 16 (56 px, patch 14)
        "next": save_llava_next(str(root / "llava_next")),  # tiles of 56 px, up to 2x2 crops
        "scorer": save_scorer(str(root / "scorer"), input_dim=32),
        "wide_scorer": save_scorer(str(root / "scorer48"), input_dim=48),
        "qwen": save_qwen2_5_vl(str(root / "qwen2_5_vl")),  # pixels 28²..32·28², 2x2 merge groups of 28 px
        "qwen_scorer": save_scorer(str(root / "scorer128"), input_dim=128),  # d_v = 4 x vision hidden 32
        "picture": save_picture(str(root / "picture.png")),
        "plain": save_picture(str(root / "plain.png"), size=(112, 112), colour=COLOUR),
        "wide": save_picture(str(root / "wide.png"), size=(160, 80), colour=COLOUR),
        "root": root,
    }


def run_command(argv):
    """The CLI's own parse + handler, returning the handler's result (main() only returns a status)."""
    args = cli.build_parser().parse_args(argv)
    return args.handler(args)


def common(files, model="llava", image="picture"):
    return ["--model", files[model], "--scorer", files["scorer"], "--image", files[image], "--device", "cpu", "--quiet"]


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------
def reference_answer(model_dir, image_path, prompt, max_new_tokens):
    """transformers' own greedy generation on the processor's inputs (every visual token)."""
    from transformers import AutoProcessor

    checkpoint = open_checkpoint(model_dir)
    model = checkpoint.load_model(torch.device("cpu"), torch.float32, progress=False)
    processor = AutoProcessor.from_pretrained(model_dir)
    text = checkpoint.chat_prompt(prompt)
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("model", ["llava", "next"])
def test_generate_end_to_end(files, model, capsys):
    prompt = "what is in the picture ?"
    result = run_command(["generate", *common(files, model), "--keep", "5", "--prompt", prompt, "--full", "--max-new-tokens", "6"])
    pruned, full = result["pruned"], result["full"]
    n = result["visual_tokens"]
    assert pruned["kept_tokens"] == 5 and pruned["visual_tokens"] == n and full["kept_tokens"] == n
    assert 1 <= len(pruned["token_ids"]) <= 6
    assert full["sequence_length"] - pruned["sequence_length"] >= n - 5  # (LLaVA-NeXT also drops newlines)
    assert result["prompt"] == "USER: <image>\nwhat is in the picture ? ASSISTANT:"
    for stage in ("vision", "prune", "pack", "prefill", "ttft", "wall"):
        assert pruned["timings_ms"][stage] >= 0
    # the unpruned answer is the model's own
    assert full["token_ids"] == reference_answer(files[model], files["picture"], prompt, 6)[: len(full["token_ids"])]
    out = capsys.readouterr().out
    assert "answer (K = 5): " in out and f"kept 5 of {n} visual tokens" in out and f"answer (all {n} tokens)" in out
    assert "TTFT" in out and "LLM prefill" in out


def test_generate_keep_ratio_through_main(files, capsys):
    assert cli.main(["generate", *common(files), "--keep-ratio", "0.25", "--prompt", "a red circle", "--max-new-tokens", "2"]) == 0
    assert "kept 4 of 16 visual tokens" in capsys.readouterr().out  # round(0.25 * 16)


def bad_generate(files, tmp):
    garbage = tmp / "garbage.png"
    garbage.write_bytes(b"this is not a picture")
    not_vlm = tmp / "not_vlm"
    not_vlm.mkdir(exist_ok=True)
    (not_vlm / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32}))
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    base = ["--prompt", "hi", "--device", "cpu"]
    model, scorer, image = files["llava"], files["scorer"], files["picture"]
    return [
        (["--model", str(tmp / "missing"), "--scorer", scorer, "--image", image, "--keep", "4"], f"--model {tmp / 'missing'}: no such directory"),
        (["--model", str(empty), "--scorer", scorer, "--image", image, "--keep", "4"], "no config.json in it"),
        (["--model", str(not_vlm), "--scorer", scorer, "--image", image, "--keep", "4"],
         "architecture ['LlamaForCausalLM'] is not supported; supported: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"),
        (["--model", model, "--scorer", str(empty), "--image", image, "--keep", "4"], "--scorer"),
        (["--model", model, "--scorer", files["wide_scorer"], "--image", image, "--keep", "4"],
         "reads vision features of width input_dim=48, but --model"),
        (["--model", model, "--scorer", scorer, "--image", str(garbage), "--keep", "4"], f"--image {garbage}: not a readable image"),
        (["--model", model, "--scorer", scorer, "--image", str(tmp / "nope.jpg"), "--keep", "4"], "no such file"),
        (["--model", model, "--scorer", scorer, "--image", image, "--keep", "17"],
         "--keep 17: this image has N = 16 visual tokens; allowed: 1 <= K <= 16"),
        (["--model", model, "--scorer", scorer, "--image", image, "--keep", "0"], "argument --keep: must be an int >= 1, got 0"),
        (["--model", model, "--scorer", scorer, "--image", image, "--keep-ratio", "1.5"], "argument --keep-ratio: must be a number in (0, 1], got 1.5"),
        (["--model", model, "--scorer", scorer, "--image", image, "--keep", "4", "--keep-ratio", "0.5"], "not allowed with argument"),
        (["--model", model, "--scorer", scorer, "--image", image], "one of the arguments --keep --keep-ratio is required"),
        (["--model", model, "--scorer", scorer, "--image", image, "--keep", "4", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an int >= 1"),
    ], base


def test_generate_bad_arguments_fail_before_loading(files, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(local_checkpoint.LocalCheckpoint, "load_model", refuse)
    cases, base = bad_generate(files, files["root"])
    for argv, message in cases:
        try:
            code = cli.main(["generate", *argv, *base])
        except SystemExit as exc:
            code = exc.code
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2, argv
        assert line.startswith("autoselect-fast generate: error: ") and message in line, (argv, line)


def test_chat_prompt_places_the_image_once(files):
    checkpoint = open_checkpoint(files["llava"])
    assert checkpoint.chat_prompt("a red circle ?") == "USER: <image>\na red circle ? ASSISTANT:"
    assert checkpoint.chat_prompt("look: <image> what ?") == "USER: look: <image> what ? ASSISTANT:"
    with pytest.raises(local_checkpoint.UsageError, match="holds the image token '<image>' 2 times"):
        checkpoint.chat_prompt("<image> and <image>")
    checkpoint.processor.chat_template = None  # a base model without a template
    assert checkpoint.chat_prompt("a red circle ?") == "<image>\na red circle ?"


def test_show_bad_arguments(files, monkeypatch, capsys):
    monkeypatch.setattr(local_checkpoint.LocalCheckpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    for extra, message in (
        (["--keep", "100", "--out", str(files["root"] / "x.png")], "--keep 100: this image has N = 16 visual tokens"),
        (["--keep", "4", "--out", str(files["root"] / "no" / "such" / "x.png")], "directory"),
    ):
        assert cli.main(["show", *common(files), *extra]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------------
def pixel_at_centre(picture, box):
    x0, y0, x1, y1 = box
    return picture.getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))


def assert_marked(picture, result):
    kept = set(result["kept"].tolist())
    dim = tuple(int(c * show.DROPPED_DIM) for c in COLOUR)
    checked = {True: 0, False: 0}
    for token, box in enumerate(result["boxes_in_png"].tolist()):
        if box[2] - box[0] < 6 or box[3] - box[1] < 6:  # slivers at the image border
            continue
        got = pixel_at_centre(picture, box)
        want = COLOUR if token in kept else dim
        assert all(abs(g - w) <= 3 for g, w in zip(got, want)), (token, token in kept, got, want)
        checked[token in kept] += 1
    assert checked[True] > 0 and checked[False] > 0


def test_show_llava(files, tmp_path, capsys):
    out = tmp_path / "kept.png"
    result = run_command(["show", *common(files, image="plain"), "--keep", "5", "--out", str(out)])
    picture = Image.open(out).convert("RGB")
    assert picture.size == result["size"]
    assert picture.width > show.PANEL_SIZE + 200 and picture.height >= show.PANEL_SIZE + show.TITLE_HEIGHT
    # 112 px image, 4x4 patches of 28 px shown at 384 / 112: token 5 is row 1, column 1
    step = show.PANEL_SIZE / 4
    x, y = show.MARGIN, show.TITLE_HEIGHT
    assert result["boxes_in_png"][5].tolist() == pytest.approx([x + step, y + step, x + 2 * step, y + 2 * step])
    # the kept tokens are the K best scores, and the similarity matrix is top-K then bottom-K
    assert sorted(result["kept"].tolist()) == sorted(result["top"].tolist())
    assert result["similarity"].shape == (10, 10) and torch.allclose(result["similarity"].diagonal(), torch.ones(10), atol=1e-5)
    assert_marked(picture, result)
    assert "mean cosine similarity among the top 5" in capsys.readouterr().out


def test_show_llava_next_draws_both_views(files, tmp_path):
    out = tmp_path / "kept_next.png"
    result = run_command(["show", *common(files, model="next", image="wide"), "--keep", "20", "--out", str(out)])
    assert result["view_names"] == ("base tile", "crop grid")
    assert result["visual_tokens"] == 16 + 32  # base tile 4x4 + a 1x2 grid of 4x4 crops, nothing unpadded
    assert_marked(Image.open(out).convert("RGB"), result)


# --------------------------------------------------------------------------------------------------
# token -> image region maps (adapters)
# --------------------------------------------------------------------------------------------------
def test_llava_regions_follow_resize_and_centre_crop(files):
    checkpoint = open_checkpoint(files["llava"])
    # 200 x 100 (w x h): shortest edge 100 -> 56, so 112 x 56 and a centre crop of 56 from x = 28
    regions = checkpoint.skeleton_adapter.token_regions((100, 200), checkpoint.image_processor)
    assert regions.boxes.shape == (16, 4) and regions.view_names == ("image",)
    scale = 56 / 100
    assert regions.boxes[0].tolist() == pytest.approx([28 / scale, 0, 42 / scale, 14 / scale])
    assert regions.boxes[15].tolist() == pytest.approx([70 / scale, 42 / scale, 84 / scale, 100])


@pytest.mark.parametrize("size", [(80, 160), (150, 60), (90, 90)])
def test_llava_next_regions_cover_the_image(files, size):
    checkpoint = open_checkpoint(files["next"])
    adapter = checkpoint.skeleton_adapter
    regions = adapter.token_regions(size, checkpoint.image_processor)
    h, w = size
    assert regions.boxes.shape[0] == adapter.layout(size).num_tokens
    boxes = regions.boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    base = regions.view == 0
    assert float(area[base].sum()) == pytest.approx(h * w)  # the base tile squashes the whole image
    # the crop grid covers the image (unpadding may keep a row/column that is partly padding)
    assert float(area[~base].sum()) == pytest.approx(h * w, rel=0.2)


# --------------------------------------------------------------------------------------------------
# Qwen2.5-VL: a saved checkpoint whose processor's video part needs torchvision (not installed)
# --------------------------------------------------------------------------------------------------
def qwen_common(files, image="picture"):
    return ["--model", files["qwen"], "--scorer", files["qwen_scorer"], "--image", files[image], "--device", "cpu", "--quiet"]


def qwen_reference_answer(model_dir, image_path, prompt_text, max_new_tokens):
    """transformers' own greedy generation, the placeholder expanded by hand (every visual token)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer, image_processor = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    pixels = image_processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    ids, pad = tokenizer(prompt_text, add_special_tokens=False)["input_ids"], model.config.image_token_id
    n = int(pixels["image_grid_thw"][0].prod()) // 4
    expanded = [t for i in ids for t in ([pad] * n if i == pad else [i])]
    input_ids = torch.tensor([expanded])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=(input_ids == pad).int(),
                         pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"], max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


def test_generate_qwen_end_to_end(files):
    """``generate`` on a saved Qwen2.5-VL: the processor is read as image processor + tokenizer (its video
    processor needs torchvision), the prompt goes through the chat template, and the unpruned answer is
    transformers' own greedy answer."""
    prompt = "what is in the picture ?"
    result = run_command(["generate", *qwen_common(files), "--keep", "5", "--prompt", prompt, "--full", "--max-new-tokens", "6"])
    pruned, full = result["pruned"], result["full"]
    n = result["visual_tokens"]
    assert n == 16  # 112 x 112 px -> 8 x 8 patches -> 4 x 4 merge groups
    assert pruned["kept_tokens"] == 5 and full["kept_tokens"] == n and full["sequence_length"] - pruned["sequence_length"] == n - 5
    assert result["prompt"] == "<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> what is in the picture ? <|im_end|> <|im_start|> assistant"
    assert 1 <= len(pruned["token_ids"]) <= 6
    assert full["token_ids"] == qwen_reference_answer(files["qwen"], files["picture"], result["prompt"], 6)[: len(full["token_ids"])]


def test_show_qwen(files, tmp_path):
    out = tmp_path / "kept_qwen.png"
    result = run_command(["show", *qwen_common(files, image="wide"), "--keep", "10", "--out", str(out)])
    assert result["visual_tokens"] == 18 and result["view_names"] == ("image",)  # 160 x 80 px -> 168 x 84 px -> 3 x 6 groups
    assert_marked(Image.open(out).convert("RGB"), result)


@pytest.mark.parametrize("size", [(100, 220), (150, 60), (56, 56), (30, 700)])
def test_qwen_regions_tile_the_image_in_raster_order(files, size):
    """Token g is merge group (row, col) of the resized image, 28 x 28 px, mapped back to the original: the
    boxes tile the image exactly, row by row, and their count is the processor's own N."""
    checkpoint = open_checkpoint(files["qwen"])
    adapter, processor = checkpoint.skeleton_adapter, checkpoint.image_processor
    h, w = size
    grid = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert list(adapter.image_size_of(h, w, processor)) == grid  # the header alone predicts the grid
    regions = adapter.token_regions(size, processor)
    rows, cols = grid[1] // 2, grid[2] // 2
    boxes = regions.boxes.view(rows, cols, 4)
    assert regions.boxes.shape[0] == adapter.layout(grid).num_tokens == rows * cols
    assert boxes[0, 0].tolist() == pytest.approx([0, 0, w / cols, h / rows], rel=1e-5)
    assert boxes[-1, -1].tolist() == pytest.approx([w - w / cols, h - h / rows, w, h], rel=1e-5)
    torch.testing.assert_close(boxes[:, 1:, 0], boxes[:, :-1, 2])  # left edge = the previous token's right edge
    torch.testing.assert_close(boxes[1:, :, 1], boxes[:-1, :, 3])
    area = (regions.boxes[:, 2] - regions.boxes[:, 0]) * (regions.boxes[:, 3] - regions.boxes[:, 1])
    assert float(area.sum()) == pytest.approx(h * w, rel=1e-5)
