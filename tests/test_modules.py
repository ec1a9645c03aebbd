"""Scorer and Denoiser: the structural properties the method relies on, and checkpoints."""
import pytest
import torch

from autoselect_fast.modules import Denoiser, DenoiserConfig, Scorer, ScorerConfig
from autoselect_fast.ragged import cu_seqlens_from_lengths

SMALL = ScorerConfig(input_dim=24, hidden_dim=32, num_layers=2, num_heads=4)


def test_default_config_is_the_published_setup():
    config = ScorerConfig()
    assert (config.num_layers, config.hidden_dim, config.num_heads, config.mlp_ratio) == (2, 1024, 16, 4.0)
    assert isinstance(Scorer(ScorerConfig(input_dim=1024)).input_proj, torch.nn.Identity)
    assert isinstance(Scorer(ScorerConfig(input_dim=1280)).input_proj, torch.nn.Linear)


def test_scorer_is_permutation_equivariant_over_tokens():
    torch.manual_seed(0)
    scorer = Scorer(SMALL).eval()
    x = torch.randn(11, 24)
    perm = torch.randperm(11)
    with torch.no_grad():
        torch.testing.assert_close(scorer(x)[perm], scorer(x[perm]), rtol=1e-5, atol=1e-5)


def test_scorer_images_attend_only_to_their_own_tokens():
    torch.manual_seed(1)
    scorer = Scorer(SMALL).eval()
    lengths = [7, 1, 12]
    x = torch.randn(sum(lengths), 24)
    cu = cu_seqlens_from_lengths(lengths)
    with torch.no_grad():
        batched = scorer(x, cu)
        alone = torch.cat([scorer(x[s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
        same_size = scorer(x[:14].view(2, 7, 24))
    assert batched.shape == (20,)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same_size, torch.stack([scorer(x[:7]), scorer(x[7:14])]), rtol=1e-5, atol=1e-5)


def test_denoiser_changing_one_token_changes_no_other_token():
    torch.manual_seed(2)
    denoiser = Denoiser(DenoiserConfig(input_dim=16)).eval()
    x = torch.randn(2, 9, 16)
    y = x.clone()
    y[1, 4] += 5.0
    with torch.no_grad():
        out_x, out_y = denoiser(x), denoiser(y)
    changed = (out_x != out_y).any(-1)
    assert changed[1, 4]
    changed[1, 4] = False
    assert not changed.any()


def test_denoiser_equals_identity_masked_attention_block():
    """The closed form equals a masked multi-head attention whose mask is the identity."""
    torch.manual_seed(3)
    denoiser = Denoiser(DenoiserConfig(input_dim=8)).eval()
    x = torch.randn(5, 8)
    h = denoiser.norm1(x)
    q, k = torch.randn(5, 8), torch.randn(5, 8)  # any queries and keys: one allowed key per query
    mask = torch.eye(5, dtype=torch.bool)
    attn = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], denoiser.value(h)[None], attn_mask=mask)[0]
    y = x + denoiser.proj(attn)
    expected = y + denoiser.mlp(denoiser.norm2(y))
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x), expected, rtol=1e-6, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    scorer, denoiser = Scorer(SMALL), Denoiser(DenoiserConfig(input_dim=24))
    scorer.save_pretrained(tmp_path / "scorer")
    denoiser.save_pretrained(tmp_path / "denoiser")
    loaded = Scorer.from_pretrained(tmp_path / "scorer", expected_input_dim=24)
    assert loaded.config == SMALL
    x = torch.randn(6, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), scorer(x))
        assert torch.equal(Denoiser.from_pretrained(tmp_path / "denoiser")(x), denoiser(x))


def test_checkpoint_mismatches_are_clear_errors(tmp_path):
    Scorer(SMALL).save_pretrained(tmp_path / "scorer")
    with pytest.raises(ValueError, match="input_dim=24, but the model's vision features have width 1024"):
        Scorer.from_pretrained(tmp_path / "scorer", expected_input_dim=1024)
    with pytest.raises(ValueError, match="holds a 'scorer', expected a 'denoiser'"):
        Denoiser.from_pretrained(tmp_path / "scorer")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Scorer.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="width 23"):
        Scorer(SMALL)(torch.randn(4, 23))
    with pytest.raises(ValueError, match="hidden_dim .* must be divisible by num_heads"):
        ScorerConfig(hidden_dim=30, num_heads=4)
