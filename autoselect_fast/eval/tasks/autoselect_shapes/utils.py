"""Document functions of the autoselect_shapes tasks: the image is a PNG next to this file."""
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    with Image.open(os.path.join(HERE, doc["image"])) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    image = doc_to_visual(doc)[0]
    return [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": doc_to_text(doc)}]}]


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target_index(doc):
    return doc["choices"].index(doc["answer"])


def first_word(text):
    words = text.strip().lower().split()
    return words[0].strip(".,!?") if words else ""


def process_results(doc, results):
    return {"accuracy": float(first_word(results[0]) == doc["answer"])}
