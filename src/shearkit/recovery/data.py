"""Training examples for recovery: instruction records (loss on responses only) or packed text.

Instruction records are formatted with the model's own chat template when the tokenizer has
one (the instruct model was tuned on that format), else with the Alpaca template. The prompt
and the response are tokenised separately and joined, so the boundary between unlabelled
prompt tokens and labelled response tokens is exact whatever the tokenizer merges.

Batches are drawn by index (`sampling.py` says which examples each micro-batch uses).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import DATASETS, TextRows, load_instructions, load_rows, tokenize_stream
from ..errors import ShearkitError, unknown

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class TrainData:
    """Tokenised examples: `input_ids[i]` and `labels[i]` (IGNORE where no loss) of equal length."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    mode: str  # instruction | text
    record: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_mode(data: str, mode: str = "auto") -> str:
    """`instruction` or `text` for a named set or a file (auto: from the set's kind or the file's records)."""
    if mode != "auto":
        return mode
    if data in DATASETS:
        return "instruction" if DATASETS[data].kind == "instructions" else "text"
    path = Path(data)
    if not (os.sep in data or path.suffix in (".txt", ".json", ".jsonl") or path.exists()):
        raise unknown("data set", data, DATASETS)
    if not path.is_file():
        raise ShearkitError(f"Recovery data file not found: {path}")
    if path.suffix in (".json", ".jsonl"):
        first = _first_record(path)
        if isinstance(first, dict) and "instruction" in first and "output" in first:
            return "instruction"
    return "text"


def _first_record(path: Path):
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        return json.loads(line)
            return None
        recs = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ShearkitError(f"Recovery data file {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ShearkitError(f"Recovery data file {path} is not UTF-8 text ({e}); convert it to UTF-8.") from None
    return recs[0] if isinstance(recs, list) and recs else recs


def build_train_data(tokenizer, data: str, *, mode: str = "auto", seqlen: int = 512, split: str | None = None,
                     data_dir: str | os.PathLike | None = None) -> TrainData:
    """Tokenise a recovery data set into examples (see the module docstring)."""
    mode = resolve_mode(data, mode)
    if mode == "instruction":
        return _instruction_data(tokenizer, data, seqlen, data_dir)
    return _text_data(tokenizer, data, seqlen, split, data_dir)


def _text_data(tokenizer, data: str, seqlen: int, split: str | None, data_dir) -> TrainData:
    ds = DATASETS.get(data)
    if ds is not None:
        split = split or "train"
        if ds.kind == "eval" and split == ds.default_split:
            raise ShearkitError(f"Training on '{data}' {split} would leak the evaluation set; use recover.data c4 or "
                                "wiki, or a train split.")
        if split not in ds.splits:
            raise ShearkitError(f"Data set '{data}' has no '{split}' split to train on (splits: "
                                f"{', '.join(ds.splits)}); use recover.data c4 or wiki.")
    return text_examples(tokenizer, load_rows(data, split, data_dir), seqlen)


def text_examples(tokenizer, rows: TextRows, seqlen: int) -> TrainData:
    """Rows packed into disjoint windows of `seqlen` tokens (every token labelled)."""
    data = rows.record.get("dataset", "the text")
    ids = tokenize_stream(tokenizer, rows.text)
    n = ids.numel() // seqlen
    if n == 0:
        raise ShearkitError(f"'{data}' holds {ids.numel()} tokens, fewer than one window of recover.seqlen={seqlen}; "
                            "lower seqlen or give more text.")
    windows = ids[: n * seqlen].view(n, seqlen).tolist()
    return TrainData(windows, [list(w) for w in windows], "text",
                     {**rows.record, "mode": "text", "examples": n, "tokens": n * seqlen, "seqlen": seqlen})


def _instruction_data(tokenizer, data: str, seqlen: int, data_dir) -> TrainData:
    return instruction_examples(tokenizer, load_instructions(data, data_dir), seqlen, data)


def instruction_examples(tokenizer, recs: list[dict], seqlen: int, data: str) -> TrainData:
    """Instruction records as examples labelled on their responses only (`data` names them in the record)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    input_ids, labels, skipped = [], [], 0
    for rec in recs:
        prompt, response = format_instruction(tokenizer, rec, chat)
        ids = (prompt + response)[:seqlen]
        lab = ([IGNORE] * len(prompt) + response)[:seqlen]
        if all(t == IGNORE for t in lab[1:]):  # the first label is never predicted
            skipped += 1
            continue
        input_ids.append(ids)
        labels.append(lab)
    if not input_ids:
        raise ShearkitError(f"Every prompt in '{data}' is longer than recover.seqlen={seqlen} tokens, so no response "
                            "token is left to train on; raise seqlen.")
    return TrainData(input_ids, labels, "instruction",
                     {"dataset": data, "mode": "instruction", "template": "chat" if chat else "alpaca",
                      "examples": len(input_ids), "skipped_too_long": skipped, "seqlen": seqlen,
                      "response_tokens": sum(sum(t != IGNORE for t in l) for l in labels)})


def format_instruction(tokenizer, rec: dict, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one Alpaca-style record (`instruction`, `input`, `output`)."""
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    if chat:
        msgs = []
        for turn in rec.get("history") or []:  # LIMA-style earlier turns: [question, answer]
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        msgs.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": rec["output"]}], tokenize=False)
        if full.startswith(prompt):
            reply = full[len(prompt):]
        else:  # a template that rewrites earlier turns: fall back to the bare answer and EOS
            reply = rec["output"] + (tokenizer.eos_token or "")
        return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
                tokenizer(reply, add_special_tokens=False)["input_ids"])
    template = ALPACA_PROMPT if rec.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=rec["instruction"], input=rec.get("input", ""))
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # BOS where the tokenizer uses one
    r_ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]  # teach the model to stop
    return p_ids, r_ids


def pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def collate(data: TrainData, indices: list[int], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of the given examples: input_ids, attention_mask, labels (IGNORE on pads)."""
    length = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), length), pad, dtype=torch.long)
    lab = torch.full((len(indices), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        lab[row, :n] = torch.tensor(data.labels[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
