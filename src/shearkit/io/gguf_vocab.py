"""A Hugging Face tokenizer as GGUF tokenizer metadata, and back.

llama.cpp tokenises with its own code, so the fields must describe the tokenizer exactly: the BPE
vocabulary in id order, its merges, each token's type, the special ids, whether a BOS/EOS is added,
and the name of the pre-tokenizer (llama.cpp's word-splitting regexes are built in and chosen by
that name). Only byte-level BPE tokenizers whose pre-tokenizer matches one llama.cpp knows are
written; anything else is refused rather than tokenised differently. The tokenizer's own
`tokenizer.json` goes in too (`tokenizer.huggingface.json`), so shearkit rebuilds the identical
Hugging Face tokenizer when it reads the file back.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import ShearkitError

# the word-splitting regexes of Llama 3's and Qwen2's tokenizer.json (a Split before a ByteLevel without regex)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# pre-tokenizer (as tokenizer.json writes it, reduced by `_pre_signature`) -> (llama.cpp's name for it,
# the BPE model's `ignore_merges` that llama.cpp assumes under that name)
_KNOWN_PRE = {
    ("ByteLevel",): ("gpt-2", False),  # GPT-2's word regex inside ByteLevel, no prefix space
    ("Digits:individual", "ByteLevel"): ("smollm", False),  # every digit alone, then GPT-2's regex
    (f"Split:{_LLAMA3_SPLIT}", "ByteLevel:no-regex"): ("llama-bpe", True),  # Llama 3: digits in threes
    (f"Split:{_QWEN2_SPLIT}", "ByteLevel:no-regex"): ("qwen2", False),  # Qwen2: every digit alone
}


def _pre_signature(pre: dict | None) -> tuple[str, ...]:
    """The pre-tokenizer reduced to what decides the split, e.g. ('Digits:individual', 'ByteLevel')."""
    if pre is None:
        return ()
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts:
        kind = p.get("type")
        if kind == "ByteLevel":
            if p.get("add_prefix_space"):
                return ("ByteLevel(add_prefix_space=True)",)
            sig.append("ByteLevel" if p.get("use_regex", True) else "ByteLevel:no-regex")
        elif kind == "Digits":
            sig.append("Digits:individual" if p.get("individual_digits") else "Digits")
        elif kind == "Split" and "Regex" in (p.get("pattern") or {}) and p.get("behavior") == "Isolated" \
                and not p.get("invert"):
            sig.append(f"Split:{p['pattern']['Regex']}")
        else:
            sig.append(str(kind))
    return tuple(sig)


def tokenizer_json(tokenizer) -> dict[str, Any]:
    """The fast tokenizer's tokenizer.json as a dict (a slow tokenizer is refused)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ShearkitError(f"The tokenizer ({type(tokenizer).__name__}) has no tokenizer.json (not a fast "
                            "tokenizer); GGUF export needs one. Save the model with a fast tokenizer.")
    return json.loads(backend.to_str())


def vocab_fields(tokenizer, n_vocab: int) -> dict[str, Any]:
    """GGUF tokenizer fields for `tokenizer` padded to the model's `n_vocab` embedding rows.

    Raises ShearkitError for tokenizers llama.cpp would split differently (not byte-level BPE,
    a normalizer, an unknown pre-tokenizer) or with more tokens than the model has rows.
    """
    from gguf import TokenType

    spec = tokenizer_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ShearkitError(f"GGUF export supports byte-level BPE tokenizers; this one is '{model.get('type')}'.")
    if spec.get("normalizer"):
        raise ShearkitError(f"The tokenizer has a normalizer ({spec['normalizer'].get('type')}), which llama.cpp's "
                            "BPE tokenizer does not apply; GGUF export refuses rather than tokenise differently.")
    sig = _pre_signature(spec.get("pre_tokenizer"))
    if sig not in _KNOWN_PRE:
        shown = [x if len(x) < 60 else x[:57] + "..." for x in sig]
        raise ShearkitError(f"The tokenizer's pre-tokenizer {shown} is not one shearkit can name for llama.cpp "
                            f"(known: {sorted(name for name, _ in _KNOWN_PRE.values())}); GGUF export refuses "
                            "rather than tokenise differently.")
    pre, ignore_merges = _KNOWN_PRE[sig]
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise ShearkitError(f"The tokenizer's pre-tokenizer is llama.cpp's '{pre}', which llama.cpp runs with "
                            f"ignore_merges={ignore_merges}, but this BPE model has ignore_merges="
                            f"{bool(model.get('ignore_merges', False))}; GGUF export refuses rather than tokenise "
                            "differently.")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise ShearkitError(f"The tokenizer has {size} tokens but the model's embedding only {n_vocab} rows; "
                            "export the tokenizer the model was trained with.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.NORMAL)
    for i, t in added.items():
        types[i] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around text, as used by shearkit
    fields: dict[str, Any] = {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
                              "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
                              "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id,
                              "hf_json": json.dumps(spec, ensure_ascii=False)}
    for name in ("bos", "eos", "pad", "unk"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is not None:
            fields[f"{name}_id"] = int(value)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["chat_template"] = template
    return fields


def add_vocab(writer, fields: dict[str, Any]) -> None:
    """Write `vocab_fields` output with a GGUFWriter."""
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    for name in ("bos", "eos", "pad", "unk"):
        if f"{name}_id" in fields:
            getattr(writer, f"add_{name}_token_id")(fields[f"{name}_id"])
    if "chat_template" in fields:
        writer.add_chat_template(fields["chat_template"])
    writer.add_string("tokenizer.huggingface.json", fields["hf_json"])


def read_tokenizer(reader):
    """The Hugging Face tokenizer stored in a GGUF file shearkit wrote (from `tokenizer.huggingface.json`)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = field_value(reader, "tokenizer.huggingface.json")
    if text is None:
        raise ShearkitError("This GGUF file holds no tokenizer.huggingface.json; shearkit cannot rebuild its "
                            "tokenizer (was it written by shearkit?).")
    tok = Tokenizer.from_str(text)
    kwargs = {}
    for name in ("bos", "eos", "pad", "unk"):
        key = {"pad": "padding", "unk": "unknown"}.get(name, name)
        i = field_value(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            kwargs[f"{name}_token"] = tok.id_to_token(int(i))
    template = field_value(reader, "tokenizer.chat_template")
    if template is not None:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def field_value(reader, key: str):
    """A GGUF metadata value (a scalar, string or list), or None when the key is absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()
