"""A character-level fast tokenizer (100 ids, fits the tiny models' vocab of 128) with a chat template."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    out.chat_template = CHAT_TEMPLATE if chat else None
    return out


# a few hundred characters of text every tiny model can tokenise (calibration / search data in tests)
TEXT = "\n".join(f"the {i} cat sat on {i * 7 % 13} mats and {i % 5} hats" for i in range(60))


def save_tiny_checkpoint(path, model=None):
    """Save `model` (default: a tiny Qwen3-MoE) with the tiny tokenizer into `path`; returns `path`."""
    from tiny_models import tiny_model

    (model if model is not None else tiny_model("qwen3_moe")).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
