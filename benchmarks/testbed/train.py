"""Train the testbed model: a tiny GQA Llama that executes the testbed's copy programs exactly.

The task (``scope_kv.testbed.task``): a prompt of bindings ``ab=7;`` and a program of lines
``ab>cd;``; the output executes the program, ``ab>cd=7;`` per line. The model learns two
single-key lookups, an induction-style copy of the next program line and the value after the
one ``name=`` of the source variable (in the prompt or in its own output).

Training recipe: a length curriculum (stages of growing bindings / items; the next stage opens
when the teacher-forced item accuracy of the current one reaches ``--advance-acc``; earlier
stages are replayed now and then), loss on the output tokens only, random position-id offsets
(positions up to ``--max-position`` are seen, so 2x-length examples are not out of range),
position jitter at line boundaries (``--jitter-prob``: without it the model finds the next
program line by counting positions, which breaks one position off the trained layout and at
other lengths; see NOTES.md, run 1),
AdamW with warmup, a constant phase and a cosine decay over the last ``--decay-frac`` of the run
(the run's length is ``--train-s`` seconds of training or ``--max-steps`` steps), bf16 autocast
and sdpa attention on CUDA.

Resumable: a checkpoint is written to ``--ckpt`` every ``--ckpt-every-s`` seconds and before
``--time-budget-s`` (wall seconds of this call, from process start) runs out; re-running the
same command continues from it. Each call also writes the current model to ``--out``
(``save_pretrained``, fp16 safetensors, + tokenizer) with the log; the call that finishes the
schedule evaluates greedy generation on fresh seeds (``final_eval.json``).

    python benchmarks/testbed/train.py --out OUT --ckpt /tmp/testbed_ckpt --time-budget-s 540 --train-s 1350
    python benchmarks/testbed/train.py --weights-from benchmarks/testbed/runs/run1 ...   # fine-tune run 1
    python benchmarks/testbed/train.py --smoke --out /tmp/tb_out --ckpt /tmp/tb_ckpt --max-steps 3

See NOTES.md next to this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
import types

import numpy as np
import torch

_START = time.monotonic()
_SRC = pathlib.Path(__file__).resolve().parents[2] / "src"


def _testbed():
    """Import ``scope_kv.testbed`` without running ``scope_kv/__init__`` (not needed to train)."""
    if "scope_kv" not in sys.modules:
        stub = types.ModuleType("scope_kv")
        stub.__path__ = [str(_SRC / "scope_kv")]
        sys.modules["scope_kv"] = stub
    import scope_kv.testbed as testbed

    return testbed


# ----------------------------------------------------------------------------- arguments

# Few facts first: a lookup among 2-4 candidate values gets a strong gradient before the
# content-matching heads exist; the last stage spans the trained setting (64 facts, 352 items)
# and twice its output (704 items), so that the 2x evaluation is not a new length.
FULL_STAGES = "2-4:4-8,4-8:8-16,8-16:16-32,16-32:32-64,32-64:64-128,48-64:128-256,56-72:288-720"
SMOKE_STAGES = "2-3:3-4,3-4:4-6"


@dataclasses.dataclass(frozen=True)
class Stage:
    """Bindings and items of one curriculum stage (both drawn uniformly per batch)."""

    bind_lo: int
    bind_hi: int
    items_lo: int
    items_hi: int


def parse_stages(text: str) -> list[Stage]:
    """``"4-8:8-16,8-16:16-32"`` -> stages (bindings range : items range)."""
    stages = []
    for part in text.split(","):
        b, m = part.split(":")
        b_lo, b_hi = (int(x) for x in b.split("-"))
        m_lo, m_hi = (int(x) for x in m.split("-"))
        if not (1 <= b_lo <= b_hi and 1 <= m_lo <= m_hi):
            raise ValueError(f"bad stage {part!r}")
        stages.append(Stage(b_lo, b_hi, m_lo, m_hi))
    return stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="final model directory (save_pretrained, fp16 safetensors + tokenizer)")
    p.add_argument("--ckpt", default="/tmp/testbed_ckpt", help="checkpoint directory (resumed from when it holds one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None,
                   help="when --ckpt holds no checkpoint: continue from a previous call's --out (weights + train_state.json)")
    p.add_argument("--evaluate", default=None, metavar="DIR",
                   help="no training: run the final greedy evaluation of the model saved in DIR and write "
                        "final_eval.json to --out (e.g. on a CPU, when a GPU call ended before it)")
    p.add_argument("--weights-from", default=None,
                   help="when --ckpt holds no checkpoint: start a NEW schedule (this call's stages, lengths and "
                        "recipe) from the weights of a previous --out of the same geometry (fine-tuning)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny model and lengths (CPU smoke test)")
    # schedule / budget
    p.add_argument("--train-s", type=float, default=0.0, help="planned training seconds in all (schedule length); 0: use --max-steps")
    p.add_argument("--max-steps", type=int, default=0, help="planned optimizer steps (schedule length when --train-s is 0)")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="wall seconds for this call, from process start (0: none)")
    p.add_argument("--call-steps", type=int, default=0, help="stop this call after this many steps (0: no limit)")
    p.add_argument("--reserve-s", type=float, default=25.0, help="seconds kept for saving before the time budget ends")
    p.add_argument("--eval-reserve-s", type=float, default=150.0, help="seconds the final greedy evaluation needs")
    p.add_argument("--ckpt-every-s", type=float, default=120.0)
    p.add_argument("--probe-every-s", type=float, default=0.0,
                   help="every so many seconds of training, log teacher-forced accuracy at --eval-lengths on 8 held-out seeds (0: off)")
    p.add_argument("--log-every", type=int, default=50)
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--head-dim", type=int, default=0, help="0: hidden // heads")
    p.add_argument("--rope-theta", type=float, default=5e5)
    p.add_argument("--max-position", type=int, default=8192)
    p.add_argument("--embed-common", type=float, default=1.0,
                   help="a vector shared by every embedding row at init, relative to the rows' random part "
                        "(bias-free RoPE attention needs a token-independent direction to attend by position)")
    p.add_argument("--embed-std", type=float, default=0.0,
                   help="init std of the (tied) embedding; 0: 1/sqrt(hidden), i.e. unit-norm rows (copying a name "
                        "then gives a confident logit from the start; the transformers default 0.02 learns the copy far slower)")
    # data / optimisation
    p.add_argument("--stages", default=None, help=f"curriculum, 'b_lo-b_hi:m_lo-m_hi,...' (default {FULL_STAGES})")
    p.add_argument("--advance-acc", type=float, default=0.97, help="teacher-forced item accuracy (EMA) that opens the next stage")
    p.add_argument("--min-stage-steps", type=int, default=50)
    p.add_argument("--replay", type=float, default=0.15, help="probability that a batch comes from an earlier stage")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--mix", default="0.3,0.3", help="source mix of the training programs: 'prompt,hot' probabilities (the rest: back)")
    p.add_argument("--early-mix", default=None,
                   help="source mix of every stage but the last two (default: --mix)")
    p.add_argument("--offset-prob", type=float, default=0.5, help="probability of a random position-id offset per row")
    p.add_argument("--jitter-prob", type=float, default=0.75,
                   help="probability that a row's position ids jump at line boundaries (after ';' and '|'), so that "
                        "the next program line can only be found by content, not by counting positions")
    p.add_argument("--jitter-rate", type=float, default=0.5,
                   help="a jittered row jumps after each boundary with a probability drawn uniformly in [0, this]")
    p.add_argument("--jitter-max", type=int, default=4, help="largest jump (extra positions) at one boundary")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.02)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--decay-frac", type=float, default=0.3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    # final evaluation
    p.add_argument("--eval-seeds", type=int, default=16, help="fresh seeds for the final greedy evaluation")
    p.add_argument("--eval-lengths", default="64:352,64:704", help="bindings:items of the final evaluation")
    p.add_argument("--eval-batch", type=int, default=16)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.kv_heads, args.ffn = 32, 2, 4, 2, 64
        args.tokens_per_step = min(args.tokens_per_step, 256)
        args.max_position = min(args.max_position, 256)
        args.log_every = 1
        args.warmup_steps = min(args.warmup_steps, 2)
        args.min_stage_steps = min(args.min_stage_steps, 1)
        args.eval_seeds = min(args.eval_seeds, 2)
        args.eval_lengths = "3:6"
        args.eval_reserve_s = 0.0
        if args.stages is None:
            args.stages = SMOKE_STAGES
    if args.stages is None:
        args.stages = FULL_STAGES
    if args.train_s <= 0 and args.max_steps <= 0 and not args.evaluate:
        p.error("give --train-s (seconds of training) or --max-steps")
    return args


# Settings a checkpoint must agree with to be resumed (the schedule length may change).
_ARCH_KEYS = ("seed", "embed_std", "embed_common", "hidden", "layers", "heads", "kv_heads", "ffn", "head_dim", "rope_theta", "max_position", "stages")


# ----------------------------------------------------------------------------- data


def make_batch(testbed, rng: np.random.Generator, stage: Stage, tokens_per_step: int, max_position: int, offset_prob: float, mix,
               jitter: tuple[float, float, int] = (0.0, 0.0, 0)):
    """One batch of one length: ids ``(B, T)``, position ids ``(B, T)``, prompt length, items, kinds ``(B, M)``.

    ``jitter = (prob, rate, max)``: with probability ``prob`` a row's position ids jump by
    ``1..max`` extra positions after a line boundary (``;`` or ``|``), each boundary with a
    probability drawn per row uniformly in ``[0, rate]`` (a row that would pass ``max_position``
    keeps contiguous ids). Output item ``i`` then no longer sits a fixed distance from program
    line ``i``, so the copy of the next line must be found by content (by the previous line's
    destination name), which holds at any length; the token order inside a line is unchanged.
    """
    n_bind = int(rng.integers(stage.bind_lo, stage.bind_hi + 1))
    n_items = int(rng.integers(stage.items_lo, stage.items_hi + 1))
    length = testbed.prompt_length(n_bind, n_items) + testbed.output_length(n_items)
    batch = max(1, tokens_per_step // length)
    progs = testbed.task.sample_programs(rng, batch, n_bind, n_items, mix)
    ids, plen = testbed.task.program_tokens(progs)
    step = np.ones((batch, length), dtype=np.int64)
    step[:, 0] = 0
    j_prob, j_rate, j_max = jitter
    if j_prob > 0 and j_max > 0:
        boundary = np.isin(ids[:, :-1], (testbed.tokenizer.SEMI, testbed.tokenizer.SEP))  # (B, T - 1)
        rate = rng.random((batch, 1)) * j_rate
        # a long row keeps a share of its jumps that fits in max_position (in expectation)
        expected = boundary.sum(axis=1, keepdims=True) * rate * (j_max + 1) / 2
        rate = rate * np.minimum(1.0, (max_position - length) / np.maximum(expected, 1e-9))
        jump = boundary & (rng.random((batch, length - 1)) < rate) & (rng.random((batch, 1)) < j_prob)
        step[:, 1:] += jump * rng.integers(1, j_max + 1, (batch, length - 1))
    pos = np.cumsum(step, axis=1)  # (B, T)
    over = pos[:, -1] >= max_position
    pos[over] = np.arange(length)  # the rare row still too long keeps contiguous ids
    room = np.maximum(0, max_position - 1 - pos[:, -1])
    offsets = np.where(rng.random(batch) < offset_prob, rng.integers(0, room + 1), 0)
    pos = pos + offsets[:, None]
    return torch.from_numpy(ids), torch.from_numpy(pos), plen, n_items, torch.from_numpy(progs.kinds.astype(np.int64))


def output_metrics(logits: torch.Tensor, ids: torch.Tensor, plen: int, n_items: int, kinds: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loss and teacher-forced exactness on the output tokens.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, 6M + 1, V)``: the predictions of output tokens ``plen .. plen + 6M`` (``</s>``).
    ids : torch.Tensor
        ``(B, T)`` token ids.
    kinds : torch.Tensor
        ``(B, M)`` source kinds (0 prompt, 1 hot, 2 back).

    Returns
    -------
    loss : torch.Tensor
        Mean cross-entropy over output tokens (scalar).
    metrics : dict
        ``item`` (all six tokens of an item right), ``value``, ``copy`` (both names), per-kind
        item accuracies, ``eos``: lazily ``.item()``-ed tensors.
    """
    target = ids[:, plen:]  # (B, 6M + 1)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    with torch.no_grad():
        hit = logits.argmax(-1) == target  # (B, 6M + 1)
        per = hit[:, : 6 * n_items].view(-1, n_items, 6)  # (B, M, 6)
        item = per.all(-1)  # (B, M)
        metrics = {
            "item": item.float().mean(),
            "value": per[..., 4].float().mean(),
            "copy": (per[..., 0] & per[..., 2]).float().mean(),
            "eos": hit[:, -1].float().mean(),
        }
        for k, name in enumerate(("prompt", "hot", "back")):
            sel = kinds == k
            metrics[f"item_{name}"] = (item & sel).sum().float() / sel.sum().clamp(min=1)
    return loss, metrics


# ----------------------------------------------------------------------------- schedule


def lr_at(args: argparse.Namespace, step: int, progress: float) -> float:
    """Warmup (steps), constant, then cosine over the last ``decay_frac`` of the run (progress in [0, 1])."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    start = 1.0 - args.decay_frac
    if progress <= start:
        frac = 1.0
    else:
        t = min(1.0, (progress - start) / max(1e-9, args.decay_frac))
        frac = args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))
    return args.lr * warm * frac


def progress_of(args: argparse.Namespace, step: int, train_s: float) -> float:
    if args.train_s > 0:
        return train_s / args.train_s
    return step / args.max_steps


# ----------------------------------------------------------------------------- state


def build_model(testbed, args: argparse.Namespace, device: torch.device):
    from transformers import LlamaForCausalLM

    config = testbed.testbed_config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.ffn,
        head_dim=args.head_dim or None,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    std = args.embed_std or args.hidden ** -0.5
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.normal_(0.0, std)
        weight += args.embed_common * std * torch.randn(args.hidden)
    return model.to(device)


def make_optimizer(model, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def save_checkpoint(path: pathlib.Path, model, opt, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "latest.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, tmp)
    os.replace(tmp, path / "latest.pt")


def log(record: dict, log_path: pathlib.Path) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(log_path, "a") as f:
        f.write(line + "\n")


# ----------------------------------------------------------------------------- evaluation


def teacher_forced(testbed, model, examples, device: torch.device, batch_size: int) -> dict:
    """Teacher-forced accuracies (:func:`output_metrics`) of ``model`` on ``examples`` (one length)."""
    n_items = examples[0].n_items
    plen = len(examples[0].prompt_ids)
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        exs = examples[start : start + batch_size]
        ids = torch.tensor([list(e.prompt_ids) + list(e.output_ids) for e in exs], device=device)
        kinds = torch.tensor([[testbed.KINDS.index(it.kind) for it in e.items] for e in exs], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, logits_to_keep=6 * n_items + 2).logits[:, :-1]
        _, metrics = output_metrics(logits, ids, plen, n_items, kinds)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(exs)
    model.train(was_training)
    return {k: v / len(examples) for k, v in sums.items()}


def length_probe(testbed, model, specs: str, device: torch.device, seeds: int = 8) -> dict:
    """Teacher-forced item accuracy at each ``bindings:items`` of ``specs`` on fixed held-out seeds."""
    out = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for spec in specs.split(","):
            n_bind, n_items = (int(x) for x in spec.split(":"))
            exs = [testbed.make_example(2_000_000_011 + i, n_bind, n_items) for i in range(seeds)]
            tf = teacher_forced(testbed, model, exs, device, batch_size=seeds)
            out[spec] = {k: round(tf[k], 4) for k in ("item", "copy", "value")}
    return out


def final_evaluation(testbed, model, args: argparse.Namespace, device: torch.device) -> dict:
    """Greedy generation (DynamicCache) and teacher-forced accuracy on fresh seeds."""
    tokenizer = testbed.build_tokenizer()
    model.eval()
    results = {}
    base_seed = 1_000_000_007
    for spec in args.eval_lengths.split(","):
        n_bind, n_items = (int(x) for x in spec.split(":"))
        seeds = [base_seed + i for i in range(args.eval_seeds)]
        t0 = time.monotonic()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            res = testbed.evaluate_caches(model, tokenizer, seeds, None, n_bindings=n_bind, n_items=n_items, batch_size=args.eval_batch)
            exs = [testbed.make_example(s, n_bind, n_items) for s in seeds]
            tf = teacher_forced(testbed, model, exs, device, args.eval_batch)
        results[spec] = {
            "greedy_item_accuracy": res.accuracy,
            "greedy_seed_accuracy": [s.accuracy for s in res.seeds],
            # where each example's first wrong item is (n_items: none); a copy slip early in the
            # output shifts every later line, so this says more than the mean
            "greedy_first_error": [int(np.argmin(s.correct)) if not all(s.correct) else n_items for s in res.seeds],
            "greedy_new_tokens": [s.new_tokens for s in res.seeds],
            "greedy_accuracy_by_kind": {
                k: float(np.mean([c for s, e in zip(res.seeds, exs) for c, it in zip(s.correct, e.items) if it.kind == k] or [0.0]))
                for k in testbed.KINDS
            },
            "teacher_forced": {k: float(v) for k, v in tf.items()},
            "prompt_tokens": len(exs[0].prompt_ids),
            "output_tokens": 6 * n_items + 1,
            "seconds": time.monotonic() - t0,
        }
        print(json.dumps({"final_eval": spec, **{k: v for k, v in results[spec].items() if k != "greedy_seed_accuracy"}}), flush=True)
    model.train()
    return results


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    testbed = _testbed()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.evaluate:
        model, _ = testbed.load_testbed(args.evaluate, device=device)
        results = final_evaluation(testbed, model, args, device)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "final_eval.json").write_text(json.dumps({"device": device.type, **results}, indent=1))
        return results
    ckpt_dir, out_dir = pathlib.Path(args.ckpt), pathlib.Path(args.out)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = ckpt_dir / "log.jsonl"
    stages = parse_stages(args.stages)
    late_mix = testbed.Mix(*(float(x) for x in args.mix.split(",")))
    early_mix = testbed.Mix(*(float(x) for x in (args.early_mix or args.mix).split(",")))
    arch = {k: getattr(args, k) for k in _ARCH_KEYS}
    jitter = (args.jitter_prob, args.jitter_rate, args.jitter_max)

    model = build_model(testbed, args, device)
    opt = make_optimizer(model, args, device)
    state = {"step": 0, "train_s": 0.0, "stage": 0, "stage_steps": 0, "ema": 0.0, "finished": False, "evaluated": False,
             "calls": 0, "arch": arch, "stage_log": []}
    ckpt_file = ckpt_dir / "latest.pt"
    resumed_from = None
    if ckpt_file.exists():
        blob = torch.load(ckpt_file, map_location=device, weights_only=False)
        if blob["state"]["arch"] != arch:
            raise SystemExit(f"{ckpt_file} was made with other settings ({blob['state']['arch']} != {arch}); use another --ckpt")
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        state = blob["state"]
        resumed_from = state["step"]
    elif args.init_from:
        # no checkpoint here (a fresh machine): continue from the weights and counters a previous
        # call wrote to its --out; the optimizer's moments restart (re-warmed over warmup steps)
        from safetensors.torch import load_file

        src = pathlib.Path(args.init_from)
        saved = json.loads((src / "train_state.json").read_text())
        if saved["arch"] != arch:
            raise SystemExit(f"{src} was trained with other settings ({saved['arch']} != {arch})")
        weights = load_file(str(src / "model.safetensors"))
        if "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        state = saved
        state["rewarm_from"] = state["step"]
        resumed_from = state["step"]
    elif args.weights_from:
        # a new schedule from trained weights: the geometry must match, the recipe may differ
        from safetensors.torch import load_file

        src = pathlib.Path(args.weights_from)
        saved = json.loads((src / "train_state.json").read_text())
        geometry = [k for k in _ARCH_KEYS if k not in ("seed", "stages", "embed_std", "embed_common")]
        if any(saved["arch"][k] != arch[k] for k in geometry):
            raise SystemExit(f"{src} has another geometry ({ {k: saved['arch'][k] for k in geometry} })")
        weights = load_file(str(src / "model.safetensors"))
        if "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        state["weights_from"] = {"path": str(src), "step": saved["step"], "train_s": saved["train_s"]}
    state["calls"] += 1
    # a longer --train-s than before continues a finished run
    state["finished"] = progress_of(args, state["step"], state["train_s"]) >= 1.0
    if not state["finished"]:
        state["evaluated"] = False
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "start", "call": state["calls"], "resumed_from": resumed_from, "device": str(device),
         "params": n_params, "args": vars(args), "startup_s": round(time.monotonic() - _START, 1)}, log_path)

    fwd = torch.compile(model, dynamic=True) if args.compile else model
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget = args.time_budget_s if args.time_budget_s > 0 else float("inf")
    last_ckpt = time.monotonic()
    acc = {}
    window_t, window_tokens, call_steps = time.monotonic(), 0, 0
    stop_reason = "finished" if state["finished"] else None
    train_s0, loop_t0 = state["train_s"], time.monotonic()
    ema_t = torch.tensor(state["ema"], device=device)

    while stop_reason is None:
        progress = progress_of(args, state["step"], state["train_s"])
        if progress >= 1.0:
            state["finished"] = True
            stop_reason = "finished"
            break
        if time.monotonic() - _START > budget - args.reserve_s:
            stop_reason = "time budget"
            break
        if args.call_steps and call_steps >= args.call_steps:
            stop_reason = "call steps"
            break
        # the decay phase runs at the final lengths
        if progress > 1.0 - args.decay_frac and state["stage"] < len(stages) - 1:
            state["stage"], state["stage_steps"], state["ema"] = len(stages) - 1, 0, 0.0
            state["stage_log"].append({"step": state["step"], "stage": state["stage"], "why": "decay phase"})
            log({"event": "stage", "step": state["step"], "stage": state["stage"], "train_s": round(state["train_s"], 1),
                 "lengths": dataclasses.asdict(stages[state["stage"]]), "why": "decay phase"}, log_path)
        rng = np.random.default_rng([args.seed, state["step"]])
        stage_idx = state["stage"]
        if stage_idx > 0 and rng.random() < args.replay:
            stage_idx = int(rng.integers(0, state["stage"]))
        mix = early_mix if stage_idx < len(stages) - 2 else late_mix
        ids, pos, plen, n_items, kinds = make_batch(testbed, rng, stages[stage_idx], args.tokens_per_step, args.max_position,
                                                   args.offset_prob, mix, jitter)
        ids, pos, kinds = ids.to(device, non_blocking=True), pos.to(device, non_blocking=True), kinds.to(device, non_blocking=True)
        lr = lr_at(args, state["step"] - state.get("rewarm_from", 0), progress)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            logits = fwd(input_ids=ids, position_ids=pos, logits_to_keep=6 * n_items + 2).logits[:, :-1]
            loss, metrics = output_metrics(logits, ids, plen, n_items, kinds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        state["step"] += 1
        call_steps += 1
        window_tokens += ids.numel()

        state["train_s"] = train_s0 + (time.monotonic() - loop_t0)
        if stage_idx == state["stage"]:
            # EMA of the current stage's item accuracy, kept on the device; read every 10 steps
            state["stage_steps"] += 1
            item = metrics["item"].detach()
            ema_t = item if state["stage_steps"] == 1 else 0.9 * ema_t + 0.1 * item
            if state["stage_steps"] % 10 == 0 or state["step"] % args.log_every == 0:
                state["ema"] = float(ema_t)
            if (state["stage_steps"] % 10 == 0 and state["ema"] >= args.advance_acc
                    and state["stage_steps"] >= args.min_stage_steps and state["stage"] < len(stages) - 1):
                state["stage"], state["stage_steps"], state["ema"] = state["stage"] + 1, 0, 0.0
                state["stage_log"].append({"step": state["step"], "stage": state["stage"], "why": "accuracy"})
                log({"event": "stage", "step": state["step"], "stage": state["stage"], "train_s": round(state["train_s"], 1),
                     "lengths": dataclasses.asdict(stages[state["stage"]])}, log_path)

        if state["step"] % args.log_every == 0 or call_steps == 1:
            acc = {k: round(float(v), 4) for k, v in metrics.items()}
            now = time.monotonic()
            log({"step": state["step"], "train_s": round(state["train_s"], 1), "stage": state["stage"], "batch_stage": stage_idx,
                 "n_items": n_items, "batch": ids.shape[0], "seq": ids.shape[1], "loss": round(float(loss.detach()), 4),
                 "lr": round(lr, 6), "gnorm": round(float(gnorm), 3), "ema": round(state["ema"], 4),
                 "tok_s": round(window_tokens / max(1e-9, now - window_t)), **acc}, log_path)
            window_t, window_tokens = now, 0
        if args.probe_every_s > 0 and state["train_s"] - state.get("last_probe_s", 0.0) >= args.probe_every_s:
            state["last_probe_s"] = state["train_s"]
            log({"event": "probe", "step": state["step"], "train_s": round(state["train_s"], 1),
                 **length_probe(testbed, model, args.eval_lengths, device)}, log_path)
        if time.monotonic() - last_ckpt > args.ckpt_every_s:
            save_checkpoint(ckpt_dir, model, opt, state)
            last_ckpt = time.monotonic()

    if progress_of(args, state["step"], state["train_s"]) >= 1.0:
        state["finished"] = True
    save_checkpoint(ckpt_dir, model, opt, state)
    files = testbed.save_testbed(model, out_dir)
    summary = {"event": "stop", "why": stop_reason, "step": state["step"], "train_s": round(state["train_s"], 1),
               "stage": state["stage"], "finished": state["finished"], "wall_s": round(time.monotonic() - _START, 1),
               "files": {p.name: p.stat().st_size for p in files}}
    log(summary, log_path)

    if state["finished"] and not state["evaluated"]:
        left = budget - (time.monotonic() - _START)
        if left >= args.eval_reserve_s:
            results = final_evaluation(testbed, model, args, device)
            (out_dir / "final_eval.json").write_text(json.dumps(results, indent=1))
            state["evaluated"] = True
            save_checkpoint(ckpt_dir, model, opt, state)
            summary["final_eval"] = {k: v["greedy_item_accuracy"] for k, v in results.items()}
            log({"event": "evaluated", **summary["final_eval"]}, log_path)
        else:
            log({"event": "evaluation deferred", "seconds_left": round(left, 1)}, log_path)
    (out_dir / "train_log.jsonl").write_text(log_path.read_text())
    (out_dir / "train_state.json").write_text(json.dumps({k: v for k, v in state.items()}, indent=1))
    return summary


if __name__ == "__main__":
    main()
