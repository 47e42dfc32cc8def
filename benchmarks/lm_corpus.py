"""A small causal language model pre-trained here on real text: the Python standard library's sources.

Benchmarks that need a language model (distillation, LLM quantization) use this module instead of
downloading one. Everything is built on this machine and cached on disk, so the second run of a
benchmark starts from the trained teacher:

- :func:`corpus_files`: the standard library's ``.py`` files (code, comments and docstrings; test
  suites and ``site-packages`` left out), split by a hash of their path into ``"train"`` and
  ``"heldout"`` (about one file in ten): held-out text comes from files training never saw.
- :func:`load_tokenizer`: a byte-level BPE (Hugging Face ``tokenizers``) trained on the training
  files only.
- :func:`token_ids`: a split's files encoded and concatenated (an end-of-text token between files).
- :func:`llama_config`: a small Llama-style ``transformers`` config.
- :func:`pretrained_lm`: a ``LlamaForCausalLM`` trained for a fixed budget (:class:`LMSpec`) on the
  training tokens, its weights cached under a key made of every setting.
- :func:`random_windows`, :func:`perplexity`: training batches and held-out perplexity;
  :func:`training_record`: how long the cached model took to train.

The cache folder is ``$COMPRESS_CALLBACKS_BENCH_CACHE`` or ``~/.cache/compress_callbacks/lm_corpus``.

    from benchmarks.lm_corpus import LMSpec, pretrained_lm, token_ids, perplexity
    spec = LMSpec(seq_len=64)            # 4 layers, width 128, vocabulary 2048, 3000 steps of 16 x 64 tokens
    teacher = pretrained_lm(spec)        # trained once (about 4 minutes on 2 idle cores), then read from disk
    print(perplexity(teacher, token_ids("heldout", spec.vocab_size), spec.seq_len))

This module has no ``main``: ``run_all.py`` lists it as "not a benchmark".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

FORMAT = 1  # bump when the corpus, the tokenizer or the training recipe changes meaning
END_OF_TEXT = "<|endoftext|>"
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "ensurepip"}


def cache_dir() -> Path:
    folder = Path(os.environ.get("COMPRESS_CALLBACKS_BENCH_CACHE", Path.home() / ".cache" / "compress_callbacks" / "lm_corpus"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def corpus_files(split: str) -> list[Path]:
    """The standard library's ``.py`` files of ``split`` (``"train"`` or ``"heldout"``), sorted by path."""
    if split not in ("train", "heldout"):
        raise ValueError(f"`split` must be 'train' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_FOLDERS)
        files += [Path(folder) / name for name in sorted(names) if name.endswith(".py")]
    heldout = lambda path: hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] < 26  # noqa: E731  ~10 %
    return [path for path in files if heldout(path) == (split == "heldout")]


def _texts(split: str, max_chars: int) -> list[str]:
    texts, total = [], 0
    for path in corpus_files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text[: max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def load_tokenizer(vocab_size: int = 2048, max_chars: int = 4_000_000):
    """A byte-level BPE of ``vocab_size`` tokens trained on the first ``max_chars`` of the training files (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir() / f"tokenizer-v{FORMAT}-{vocab_size}-{max_chars}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_texts("train", max_chars), trainer=trainer)
    tokenizer.save(str(path))
    return tokenizer


def token_ids(split: str, vocab_size: int = 2048, max_chars: int | None = None) -> torch.Tensor:
    """A split's files as one int64 tensor of token ids (cached); ``max_chars`` defaults to 4M (train), 400k (held out)."""
    max_chars = max_chars or (4_000_000 if split == "train" else 400_000)
    path = cache_dir() / f"tokens-v{FORMAT}-{split}-{vocab_size}-{max_chars}.npy"
    if not path.exists():
        tokenizer = load_tokenizer(vocab_size)
        end = tokenizer.token_to_id(END_OF_TEXT)
        ids: list[int] = []
        for encoding in tokenizer.encode_batch(_texts(split, max_chars)):
            ids += encoding.ids + [end]
        np.save(path, np.asarray(ids, dtype=np.int32))
    return torch.from_numpy(np.load(path).astype(np.int64))


def llama_config(vocab_size: int = 2048, layers: int = 4, width: int = 128, heads: int = 4, seq_len: int = 128):
    """A small Llama-style config (RMSNorm, rotary positions, SwiGLU MLP of width ``8/3 * width``, untied head)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=int(8 * width / 3) // 8 * 8,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=seq_len, tie_word_embeddings=False, attn_implementation="sdpa")


@dataclasses.dataclass(frozen=True)
class LMSpec:
    """Everything that decides a pre-trained model: architecture, data and training budget."""

    vocab_size: int = 2048
    layers: int = 4
    width: int = 128
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 3000
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]

    def config(self):
        return llama_config(self.vocab_size, self.layers, self.width, self.heads, self.seq_len)


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches ``[batch_size, seq_len]`` of windows at random offsets (the same for the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (steps, batch_size), generator=generator)
    return [ids[s[:, None] + torch.arange(seq_len)] for s in starts]


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int, warmup: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (5 % of the steps by default) then cosine decay to 10 % of the peak."""
    warmup = max(1, steps // 20) if warmup is None else warmup
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))


def train_lm(model: torch.nn.Module, batches: list[torch.Tensor], lr: float, log_every: int = 0, *, weight_decay: float = 0.1,
             on_optimizer=None, step_seconds: list[float] | None = None) -> list[float]:
    """Plain next-token training with AdamW (grad-norm clip 1.0, cosine schedule); returns the losses.

    ``on_optimizer(optimizer)`` runs once before the first step (a compression manager attaches
    there); ``step_seconds``, when given, receives each step's wall time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if on_optimizer is not None:
        on_optimizer(optimizer)
    schedule = cosine_lr(optimizer, len(batches))
    model.train()
    losses = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{len(batches)}: loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    return losses


def pretrained_lm(spec: LMSpec = LMSpec(), log_every: int = 0):
    """A ``LlamaForCausalLM`` trained per ``spec`` on the training split, in eval mode (read from the cache when there)."""
    from transformers import LlamaForCausalLM

    folder = cache_dir() / f"lm-{spec.key()}"
    if (folder / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(spec.config())
    batches = random_windows(token_ids("train", spec.vocab_size), spec.batch_size, spec.seq_len, spec.steps, spec.seed)
    start = time.perf_counter()
    train_lm(model, batches, spec.lr, log_every)
    model.save_pretrained(folder.with_suffix(".partial"))
    (folder.with_suffix(".partial") / "training.json").write_text(
        json.dumps({**dataclasses.asdict(spec), "seconds": round(time.perf_counter() - start, 1)}))
    os.replace(folder.with_suffix(".partial"), folder)
    return model.eval()


def training_record(spec: LMSpec) -> dict | None:
    """What :func:`pretrained_lm` recorded when it trained ``spec`` (its settings and ``seconds``), or None."""
    path = cache_dir() / f"lm-{spec.key()}" / "training.json"
    return json.loads(path.read_text()) if path.exists() else None


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 16, max_windows: int | None = None) -> float:
    """``exp`` of the mean next-token loss over consecutive non-overlapping windows of ``ids``."""
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)[:max_windows]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)
