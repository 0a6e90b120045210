"""Ours side by side with TRL + Liger and Unsloth on one GPU, and an ablation ladder of our speed switches.

    python bench/compare_gpu.py --preset 0.8b --batch 32 --unsloth-target /tmp/unsloth-site            # LoRA
    python bench/compare_gpu.py --preset 0.8b --batch 32 --quantization 4bit --unsloth-target ...       # QLoRA
    python bench/compare_gpu.py --preset 30m --batch 4 --steps 3 --rounds 1 --methods ours,trl          # CPU smoke

Methods (`--methods`, comma-separated; `all` = ours,ladder,trl_liger,unsloth):

- ``ours``: our default path, `bench/common.py` build_default_trainer (load_model -> apply_peft -> build_trainer).
- ``ladder``: ours with the speed switches of TrainingConfig turned on one by one, cumulatively, in the order
  of issue 20 (`--ladder` to choose): ``ours+fused_lora``, ``ours+fused_lora+liger_kernels``, ... Each is
  passed as ``key=true`` through bench_config, as ``--set key=true`` would be; a key this checkout's config
  does not know is reported as skipped, with the reason.
- ``trl``: plain TRL SFTTrainer on the model directory, with peft_config (its own defaults otherwise).
- ``trl_liger``: the same with ``use_liger_kernel=True`` (TRL 1.16 applies Liger's RMSNorm/RoPE/SwiGLU and
  keeps its own chunked LM-head loss). Needs CUDA and liger-kernel.
- ``unsloth``: Unsloth as shipped: FastLanguageModel.from_pretrained on the same directory, get_peft_model,
  TRL's SFTTrainer as Unsloth patches it. Needs CUDA and ``--unsloth-target`` (below). On a CPU,
  ``--unsloth-cpu`` runs it anyway through Unsloth's CPU fallback (stock transformers + PEFT + TRL): a check
  of this script's plumbing and of Unsloth's package stack, not a speed comparison.

Everything that could differ between methods and is not the method itself is fixed:

- the same model directory (built locally from the preset, random weights, saved once), LoRA r=16,
  alpha 32 on q/k/v/o/gate/up/down, dropout 0, no bias, bf16 (weights and autocast on a GPU), no gradient
  checkpointing, fused AdamW (``adamw_torch_fused``), the same learning rate, schedule, clipping and seed;
- the same LoRA initialisation: the parent draws A (PEFT's kaiming-uniform) and B = 0 once and every
  method copies them in (``lora_init`` in the JSON says where that was possible);
- the same batches: the parent tokenises once (our `prepare_data`), picks ``steps x batch`` rows, orders
  them into length-grouped batches (what our default sampler does), and writes them to one file that
  every process reads in order (a sequential sampler replaces each trainer's own). So every method trains
  on the same real tokens per step, with the same padding; padding and sampling themselves are measured
  by bench/throughput.py, not here.

Each method runs in its own process (started together, so imports and loading overlap) and gets its own
warm-up: one full untimed round over the very batches the timed rounds use, so CUDA/Triton JIT, autotuning
and torch.compile (its compile time is ``warmup_s``) are out of the timed rounds. The first step of the
warm-up gives the first-step loss: all methods start from the same weights and LoRA, so it should agree to
bf16 rounding (``first_loss_max_rel_diff``). Then ``--rounds`` timed rounds, interleaved (the order rotates
every round): each times steps 2..N between two device syncs, logging off inside (logging_steps far above
N). Tokens and FLOPs per window are the file's (`mfu.step_flops`, attention per row); each method's own
`mfu.FlopCounter` hook counts them on the device, read after the window, as a check (``same_tokens``).
``--warmup-parallel`` runs several warm-ups at once (each holds a batch's activations; their ``warmup_s``
then overlap); ``--deadline`` stops starting warm-ups and rounds so that the JSON still comes in time. MFU is
against the matmul peak measured in this script and against the spec sheet (`mfu.SPEC_PEAK_BF16_TFLOPS`).

The last line printed is one JSON object: per method status (ok / skipped / failed, with the reason),
tok/s (real tokens), TFLOP/s, MFU vs measured and spec peak, first-step loss, warm-up seconds, versions;
and the ratios ours/unsloth and ours/trl_liger.

Unsloth 2026.10.9 pins transformers <= 5.17, trl <= 1.15 and datasets < 5, so its process runs with its own
packages first on PYTHONPATH (``--unsloth-target DIR``, a ``pip install --target``), in front of whatever
PYTHONPATH the parent has (there: /tmp/site, our stack); the rest comes from the machine's image. The wheels,
for the device's Python 3.12, on a machine with pip access, from the repository root (`python bench/carry.py`
runs exactly this and slims two wheels to fit the 64 MiB carry; bench/DEVICE.md has the sizes and the calls)::

    PLAT="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
    pip download $PLAT -d .whl transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 \
      multiprocess==0.70.19 liger-kernel==0.8.5 bitsandbytes==0.50.2
    pip download $PLAT -d .whl-unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 transformers==5.17.0 \
      trl==1.15.0 datasets==4.8.5 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 \
      msgspec==0.23.0 cut_cross_entropy==25.1.1 torchao==0.18.0 pydantic==2.14.4 pydantic_core==2.50.5 \
      annotated_types==0.8.0 typing_inspection==0.4.5 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0

and on the device::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/unsloth-site .whl-unsloth/*.whl
    PYTHONPATH=/tmp/site python3 bench/compare_gpu.py ... --unsloth-target /tmp/unsloth-site

Not carried: xformers (Unsloth's optional attention backend, built for one torch; without it Unsloth uses
torch's SDPA), hf_transfer and diffusers (downloads and diffusion models only). The wheels are never
committed (``/.whl*/`` in .git/info/exclude).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# No torch or transformers at module level: the Unsloth worker must import unsloth before transformers.
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

SEQ = 512  # max_seq_length of every method (bench/common.py's); no row is longer
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# TrainingConfig's speed switches, in issue 20's order (all bool, default false).
LADDER = ("fused_lora", "liger_kernels", "fused_cross_entropy", "compile_layers")
OTHERS = ("trl", "trl_liger", "unsloth")
DEFAULT_METHODS = "ours,ladder,trl_liger,unsloth"
MARK = "@@compare "  # prefix of the protocol lines on a worker's stdout; everything else goes to its log
NO_LOGGING_STEPS = 1_000_000
HYPER = dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.03, weight_decay=0.0, max_grad_norm=1.0)
SEED = 42


# --------------------------------------------------------------------------- parent


def resolve_methods(methods: str, ladder: str | None) -> list[tuple[str, list[str]]]:
    """[(name, config keys switched on)] in run order: ours, the ladder's rungs, then the others."""
    rungs = [r.split("+") for r in ladder.split(",")] if ladder else [list(LADDER[: i + 1]) for i in range(len(LADDER))]
    tokens = [m.strip() for m in methods.split(",") if m.strip()]
    wanted = [w for m in tokens for w in (DEFAULT_METHODS.split(",") if m == "all" else [m])]
    out: list[tuple[str, list[str]]] = []
    for m in wanted:
        if m in ("plain", "trl_plain"):
            m = "trl"
        if m == "ours":
            out.append(("ours", []))
        elif m == "ladder":
            out.extend(("ours+" + "+".join(keys), keys) for keys in rungs)
        elif m.startswith("ours+"):
            out.append((m, m.split("+")[1:]))
        elif m in OTHERS:
            out.append((m, []))
        else:
            raise SystemExit(f"unknown method {m!r}: use ours, ladder, ours+KEY[+KEY...], {', '.join(OTHERS)} or all")
    seen: set[str] = set()
    return [x for x in out if not (x[0] in seen or seen.add(x[0]))]


def tokenise_rows(model_dir: Path, workdir: Path, batch: int, steps: int) -> tuple[Path, list[int]]:
    """Tokenise once with our data path and write ``steps x batch`` rows, in batch order, to one JSONL file.

    Rows are drawn with the seed, sorted by length and cut into batches (one megabatch, as our length-grouped
    sampler makes them), and the batches shuffled: mixed lengths from step to step, little padding inside one.
    Returns the file and the rows' lengths, in file order.
    """
    import random

    from common import bench_config
    from transformers import PreTrainedTokenizerFast

    from autotuning.data import prepare_data

    path = workdir / f"rows-{model_dir.name}-{batch}x{steps}.jsonl"
    if not path.is_file():
        config = bench_config(workdir, model_name=str(model_dir))
        # The builtin tokenizer class, whatever the architecture: AutoTokenizer would give a Qwen2 directory
        # Qwen2Tokenizer, which swaps the saved pre-tokenizer (see autotuning.modeling.load_tokenizer).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        train = prepare_data(config, tokenizer).train
        need = batch * steps
        if len(train) < need:
            raise SystemExit(f"{len(train)} rows, {need} needed: lower --steps or --batch")
        rng = random.Random(SEED)
        picked = sorted(rng.sample(range(len(train)), need), key=lambda i: -len(train[i]["input_ids"]))
        batches = [picked[i : i + batch] for i in range(0, need, batch)]
        rng.shuffle(batches)
        with path.open("w", encoding="utf-8") as f:
            for i in (i for b in batches for i in b):
                row = train[i]
                f.write(json.dumps({"input_ids": row["input_ids"], "completion_mask": row["completion_mask"]}) + "\n")
    lengths = [len(json.loads(line)["input_ids"]) for line in path.read_text(encoding="utf-8").splitlines()]
    return path, lengths


def write_lora_init(model_dir: Path, workdir: Path) -> Path:
    """LoRA A (PEFT's kaiming-uniform, seeded) and B = 0 for every targeted linear, keyed by its module path
    in the base model (``model.layers.0.self_attn.q_proj``): every method copies these in."""
    import math

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = workdir / f"lora-init-{model_dir.name}-r{LORA_R}.safetensors"
    if path.is_file():
        return path
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    generator = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            a = torch.empty(LORA_R, module.in_features)
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)): bound = 1/sqrt(fan_in)
            a.uniform_(-bound, bound, generator=generator)
            tensors[f"{name}.lora_A"] = a
            tensors[f"{name}.lora_B"] = torch.zeros(module.out_features, LORA_R)
    save_file(tensors, str(path))
    return path


def expected_window(lengths: list[int], batch: int) -> tuple[int, int]:
    """(real tokens, causal pairs) of steps 2..N of one round: every row but the first batch."""
    rest = lengths[batch:]
    return sum(rest), sum(t * (t + 1) // 2 for t in rest)


def unknown_keys(keys: list[str], workdir: Path, model_dir: Path) -> str | None:
    """Why a rung cannot run with this checkout's config (an unknown or refused key), or None."""
    from common import bench_config

    from autotuning.errors import ConfigError

    try:
        bench_config(workdir, model_name=str(model_dir), **{k: True for k in keys})
    except ConfigError as exc:
        return f"config refuses {'+'.join(keys)}: {exc}".replace("\n", " ")
    return None


def why_skipped(name: str, keys: list[str], args, model_dir: Path, cuda: bool) -> str | None:
    import importlib.util

    if keys:
        return unknown_keys(keys, args.workdir, model_dir)
    if name == "trl_liger":
        if not cuda:
            return "needs CUDA (Liger's kernels are Triton)"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel==0.8.5)"
    if name == "unsloth":
        if not cuda and not args.unsloth_cpu:
            return "needs CUDA (Unsloth's own kernels; on a CPU it falls back to stock transformers+PEFT+TRL)"
        if args.unsloth_target is None:
            return "no --unsloth-target (its pins clash with ours: transformers<=5.17, trl<=1.15, datasets<5)"
        if not (args.unsloth_target / "unsloth" / "__init__.py").is_file():
            return f"no unsloth package under --unsloth-target {args.unsloth_target}"
    return None


class Worker:
    """One method's process: protocol lines on its stdout, everything else (and stderr) in its log file."""

    def __init__(self, name: str, spec: dict, workdir: Path, env: dict):
        self.name = name
        self.log_path = workdir / "logs" / f"{name.replace('+', '_')}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        run_dir = workdir / "runs" / name.replace("+", "_")
        run_dir.mkdir(parents=True, exist_ok=True)  # Unsloth writes unsloth_compiled_cache/ into its cwd
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self._log = self.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=run_dir,
            env=env,
        )
        self.pending = ("start", time.perf_counter())  # (command, when sent): what the next reply answers
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._replies.put(json.loads(line[len(MARK) :]))
            else:
                self._log.write(line)
                self._log.flush()
        self._replies.put(None)  # end of output: the process is gone

    def send(self, command: str) -> None:
        self.pending = (command, time.perf_counter())
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the reply says what happened

    def poll(self, wait: float, timeout: float) -> dict | None:
        """The reply to the pending command (or to the start), an error reply once ``timeout`` seconds have passed
        since it was sent, or None if there is none yet after waiting ``wait`` seconds."""
        command, since = self.pending
        try:
            reply = self._replies.get(timeout=wait)
        except queue.Empty:
            if time.perf_counter() - since < timeout:
                return None
            self.proc.kill()
            return {"error": f"no answer to {command} within {timeout:.0f} s", "log_tail": self.tail()}
        if reply is None:
            self.proc.wait()
            return {"error": f"the process ended (exit code {self.proc.returncode})", "log_tail": self.tail()}
        return reply

    def ask(self, command: str | None, timeout: float) -> dict:
        """Send a command (None: only wait for the start) and wait for the reply, or an error reply."""
        if command is not None:
            self.send(command)
        while (reply := self.poll(1.0, timeout)) is None:
            pass
        return reply

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self, timeout: float = 60):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def worker_env(name: str, args) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; nothing may wait on a network
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if name == "unsloth" and args.unsloth_target is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.unsloth_target), env.get("PYTHONPATH", "")) if p)
        env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    return env


def model_work(model_dir: Path) -> dict:
    """What one real token and one attention pair cost in this workload: the matmul weights (frozen, LoRA-trained)
    of the model with r=16 on the 7 linears, its layers and attention width, from a meta-device skeleton."""
    import torch
    from mfu import attention_width
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    frozen = trained = 0
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear):
            frozen += module.in_features * module.out_features
            if name.rsplit(".", 1)[-1] in TARGETS:
                trained += LORA_R * (module.in_features + module.out_features)
    return dict(frozen=frozen, trained=trained, layers=config.num_hidden_layers, width=attention_width(config))


def summarise(result: dict, peak: float, spec_peak: float | None, expected: tuple[int, int], work: dict) -> dict:
    """tok/s and MFU of one method over its timed rounds.

    Tokens and FLOPs are the file's (every method trains on the same batches), not what the method's own hook
    counted: a trainer that dropped the attention mask would otherwise count its padding as work. The hook's
    counts only check that: ``same_tokens``; ``same_work`` checks the method's LoRA model has the expected
    matmul weights.
    """
    from mfu import step_flops

    rounds = result.get("rounds", [])
    out = {k: v for k, v in result.items() if k != "rounds"}
    if "matmul_weights" in result:
        out["same_work"] = result["matmul_weights"] == [work["frozen"], work["trained"]]
    seconds = sum(r["seconds"] for r in rounds)
    if not rounds or seconds <= 0:
        return out
    flops_per_round = step_flops(work["frozen"], work["trained"], work["layers"], work["width"], *expected)
    gflop_s = flops_per_round * len(rounds) / seconds / 1e9
    out.update(
        tok_s=round(expected[0] * len(rounds) / seconds, 1),
        tok_s_per_round=[round(expected[0] / r["seconds"], 1) for r in rounds],
        tflop_s=round(gflop_s / 1000, 3),
        mfu_measured=round(gflop_s / peak, 4),
        mfu_spec=round(gflop_s / spec_peak, 4) if spec_peak else None,
        timed_steps=sum(r["steps"] for r in rounds),
        same_tokens=all((r["tokens"], r["pairs"]) == expected for r in rounds),
    )
    return out


def main_parent(args) -> int:
    import torch
    from common import print_result, workload
    from mfu import PRESETS, build_preset, peak_matmul_gflops, spec_peak_bf16_gflops

    cuda = torch.cuda.is_available()
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}: one of {', '.join(sorted(PRESETS))}")
    methods = resolve_methods(args.methods, args.ladder)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    peak = peak_matmul_gflops(torch.bfloat16)
    spec_peak = spec_peak_bf16_gflops()
    if cuda:
        torch.cuda.empty_cache()
    print(f"bf16 matmul peak: measured {peak:.0f} GFLOP/s, spec sheet {spec_peak or 'none for this device'}")

    model_dir = build_preset(args.preset, args.workdir) or workload(args.workdir)[0]
    rows, lengths = tokenise_rows(model_dir, args.workdir, args.batch, args.steps)
    lora_init = write_lora_init(model_dir, args.workdir)
    expected = expected_window(lengths, args.batch)
    work = model_work(model_dir)
    print(f"model {model_dir}; {len(lengths)} rows ({sum(lengths)} tokens) in {args.steps} batches of {args.batch}")

    spec = dict(
        model=str(model_dir),
        rows=str(rows),
        lora_init=str(lora_init),
        batch=args.batch,
        steps=args.steps,
        quantization=args.quantization,
        workdir=str(args.workdir),
        repo=str(BENCH.parent),
    )
    results: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    for name, keys in methods:
        reason = why_skipped(name, keys, args, model_dir, cuda)
        if reason:
            results[name] = {"status": "skipped", "reason": reason}
            print(f"{name}: skipped: {reason}")
            continue
        workers[name] = Worker(name, {**spec, "method": name, "keys": keys}, args.workdir, worker_env(name, args))

    def past_deadline() -> bool:
        return bool(args.deadline) and time.perf_counter() - started > args.deadline

    def fail(name: str, reply: dict):
        results[name] = {**results.get(name, {}), "status": "failed", **reply}
        workers.pop(name).close(timeout=5)
        print(f"{name}: failed: {reply.get('error')}\n{reply.get('log_tail', '')}")

    for name in list(workers):  # they load in parallel; collect them in order
        reply = workers[name].ask(None, args.timeout)
        if "error" in reply:
            fail(name, reply)
        else:
            results[name] = {"status": "ok", **reply}
    # Warm-ups, longest first (compilation, Unsloth's patching), at most --warmup-parallel at a time: they are
    # untimed, and their JIT and compile work is mostly on the CPU.
    todo = sorted(workers, key=lambda n: ("compile_layers" not in n, n != "unsloth"))
    running: list[str] = []
    while todo or running:
        if todo and past_deadline():
            for name in todo:  # better a JSON without them than none: the device call would be killed
                results[name] = {
                    "status": "skipped",
                    "reason": f"--deadline {args.deadline:.0f} s passed before its warm-up",
                }
                workers.pop(name).close(timeout=5)
            todo = []
        while todo and len(running) < args.warmup_parallel:
            running.append(todo.pop(0))
            workers[running[-1]].send("warmup")
        for name in list(running):
            reply = workers[name].poll(0.2, args.timeout)
            if reply is None:
                continue
            running.remove(name)
            if "error" in reply:
                fail(name, reply)
                continue
            results[name].update(reply, rounds=[])
            print(f"{name}: warm-up {reply['warmup_s']:.1f} s, first-step loss {reply['first_loss']}")
    rounds_done = 0
    for r in range(args.rounds):
        if past_deadline():
            print(f"--deadline {args.deadline:.0f} s passed: {rounds_done} of {args.rounds} rounds done")
            break
        names = list(workers)
        for name in names[r % len(names) :] + names[: r % len(names)] if names else []:
            reply = workers[name].ask("round", args.timeout)
            if "error" in reply:
                fail(name, reply)
                continue
            results[name]["rounds"].append(reply)
            print(f"round {r + 1} {name}: {expected[0] / reply['seconds']:.0f} tok/s")
        rounds_done += 1
    for worker in workers.values():
        worker.close()

    summary = {name: summarise(results[name], peak, spec_peak, expected, work) for name, _keys in methods}
    losses = {n: s["first_loss"] for n, s in summary.items() if s.get("first_loss") is not None}
    spread = None
    if len(losses) > 1:
        ref = min(losses.values(), key=abs) or 1.0
        spread = (max(losses.values()) - min(losses.values())) / abs(ref)

    def ratio(a: str, b: str) -> float | None:
        x, y = summary.get(a, {}).get("tok_s"), summary.get(b, {}).get("tok_s")
        return round(x / y, 3) if x and y else None

    print(f"\n{'method':<64} {'status':<8} {'tok/s':>9} {'MFU meas':>9} {'MFU spec':>9} {'1st loss':>9} {'warm s':>7}")
    for name, s in summary.items():
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
        print(
            f"{name:<64} {s['status']:<8} {s.get('tok_s', '-'):>9} {pct(s.get('mfu_measured')):>9} "
            f"{pct(s.get('mfu_spec')):>9} {s.get('first_loss', '-'):>9} {s.get('warmup_s', '-'):>7}"
        )
    print_result(
        {
            "methods": summary,
            "ratio_ours_vs_unsloth": ratio("ours", "unsloth"),
            "ratio_ours_vs_trl_liger": ratio("ours", "trl_liger"),
            "ratio_ours_vs_trl": ratio("ours", "trl"),
            "first_loss_max_rel_diff": round(spread, 6) if spread is not None else None,
            "peak_bf16_gflops": round(peak, 1),
            "spec_peak_bf16_gflops": spec_peak,
            "preset": args.preset,
            "quantization": args.quantization,
            "batch": args.batch,
            "steps_per_round": args.steps,
            "rounds": rounds_done,
            "warmup_parallel": args.warmup_parallel,
            "window_tokens_per_round": expected[0],
            "matmul_weights": [work["frozen"], work["trained"]],
            "wall_s": round(time.perf_counter() - started, 1),
        }
    )
    return 0


# --------------------------------------------------------------------------- worker


def emit(payload: dict) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def load_rows(path: str):
    import datasets

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return datasets.Dataset.from_list(rows)


def weights_dtype():
    """bf16 weights on a GPU; fp32 weights on a CPU (bf16 autocast does the math), as our load_model does."""
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def bnb_4bit(dtype):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
    )


def sft_arguments(spec: dict, out: Path, **extra):
    """TRL's SFTConfig with every knob the comparison fixes, the rest TRL's defaults."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        learning_rate=HYPER["learning_rate"],
        lr_scheduler_type=HYPER["lr_scheduler_type"],
        warmup_steps=HYPER["warmup_ratio"],  # < 1: a fraction of the steps, as ours passes it
        weight_decay=HYPER["weight_decay"],
        max_grad_norm=HYPER["max_grad_norm"],
        seed=SEED,
        data_seed=SEED,
        bf16=True,
        gradient_checkpointing=False,
        optim="adamw_torch_fused",
        # Loss on the answers only, as ours: with the default (None) TRL took a pre-tokenised dataset's
        # completion_mask for nothing and trained on every token (seen on CPU with TRL 1.16 and 1.15).
        completion_only_loss=True,
        max_length=SEQ,
        logging_steps=NO_LOGGING_STEPS,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_ours(spec: dict, dataset):
    from common import bench_config, build_default_trainer

    sets = {
        "model_name": spec["model"],
        "per_device_train_batch_size": spec["batch"],
        "max_seq_length": SEQ,
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",  # every linear but the head: the 7 of a Llama/Qwen2 layer
        "gradient_checkpointing": False,
        "logging_steps": NO_LOGGING_STEPS,
        "max_steps": spec["steps"],
        "seed": SEED,
        **{k: v for k, v in HYPER.items()},
        **{k: True for k in spec["keys"]},
    }
    if spec["quantization"] == "4bit":
        sets.update(quantization="4bit", peft_type="qlora")
    config = bench_config(Path(spec["workdir"]), **sets)
    trainer, _precision = build_default_trainer(config, Path.cwd(), lambda model: [], train_dataset=dataset)
    return trainer


def build_trl(spec: dict, dataset, liger: bool):
    import torch
    from transformers import PreTrainedTokenizerFast
    from trl import SFTTrainer

    dtype = weights_dtype()
    init = {"dtype": dtype}
    if spec["quantization"] == "4bit":
        init.update(quantization_config=bnb_4bit(dtype), device_map={"": 0} if torch.cuda.is_available() else None)
    return SFTTrainer(
        model=spec["model"],
        args=sft_arguments(spec, Path.cwd() / "out", use_liger_kernel=liger, model_init_kwargs=init),
        train_dataset=dataset,
        processing_class=PreTrainedTokenizerFast.from_pretrained(spec["model"]),
        peft_config=lora_config(),
    )


def build_unsloth(spec: dict, dataset):
    import torch
    from trl import SFTTrainer
    from unsloth import FastLanguageModel  # imported first in main_worker, before transformers

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model"],
        max_seq_length=SEQ,
        dtype=torch.bfloat16 if torch.cuda.is_available() else None,
        load_in_4bit=spec["quantization"] == "4bit",  # Unsloth's default is True: say it
        use_gradient_checkpointing=False,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0,
        target_modules=TARGETS,
        bias="none",
        use_gradient_checkpointing=False,
        random_state=SEED,
    )
    return SFTTrainer(
        model=model,
        args=sft_arguments(spec, Path.cwd() / "out"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def copy_lora_init(model, path: str) -> str:
    """Copy the parent's LoRA A/B into every adapter; 'shared' when each one was found, else why not."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path)
    done = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
                continue
            key = name.replace("_orig_mod.", "").removeprefix("base_model.model.")
            if f"{key}.lora_A" not in tensors:
                continue
            lora_a["default"].weight.copy_(tensors[f"{key}.lora_A"])
            lora_b["default"].weight.copy_(tensors[f"{key}.lora_B"])
            done += 1
    expected = len(tensors) // 2
    return "shared" if done == expected else f"own (copied {done} of {expected} adapters)"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "liger-kernel", "unsloth"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main_worker(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    method = spec["method"]
    sys.path.insert(0, spec["repo"])
    if method == "unsloth":
        import unsloth  # noqa: F401  before anything imports transformers

    import torch
    from mfu import FlopCounter, StepClock
    from transformers import TrainerCallback

    torch.manual_seed(SEED)
    dataset = load_rows(spec["rows"])
    if method == "unsloth":
        trainer = build_unsloth(spec, dataset)
    elif method in ("trl", "trl_liger"):
        trainer = build_trl(spec, dataset, liger=method == "trl_liger")
    else:
        trainer = build_ours(spec, dataset)
    # The rows are already in batch order: read them so, whatever sampler the trainer would pick.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    model = trainer.model
    lora_init = copy_lora_init(model, spec["lora_init"])
    clock = StepClock(FlopCounter(model))

    class Losses(TrainerCallback):
        def __init__(self):
            self.logged: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logged.append(float(logs["loss"]))

    losses = Losses()
    trainer.add_callback(clock)
    trainer.add_callback(losses)
    emit(
        {
            "versions": versions(),
            "lora_init": lora_init,
            "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
            "bf16": bool(trainer.args.bf16),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "matmul_weights": [clock.counter.frozen_params, clock.counter.trained_params],
            "trainer": type(trainer).__name__,
        }
    )

    def run(steps: int, first_and_last: bool):
        trainer.args.max_steps = steps
        # Logging reads the loss back from the device: only in the warm-up (steps 1 and N), never in a window.
        trainer.args.logging_first_step = first_and_last
        trainer.args.logging_steps = steps if first_and_last else NO_LOGGING_STEPS
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # idle workers hold only their weights while another one is timed

    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        try:
            if command == "warmup":
                start = time.perf_counter()
                losses.logged.clear()
                run(spec["steps"], first_and_last=True)
                emit(
                    {
                        "warmup_s": round(time.perf_counter() - start, 2),
                        "first_loss": losses.logged[0] if losses.logged else None,
                        "warmup_last_loss": losses.logged[1] if len(losses.logged) > 1 else None,
                    }
                )
            elif command == "round":
                before = (clock.seconds, clock.tokens, clock.pairs, clock.flops, clock.steps)
                run(spec["steps"], first_and_last=False)
                after = (clock.seconds, clock.tokens, clock.pairs, clock.flops, clock.steps)
                emit(
                    dict(zip(("seconds", "tokens", "pairs", "flops", "steps"), (a - b for a, b in zip(after, before))))
                )
            else:
                emit({"error": f"unknown command {command!r}"})
        except Exception as exc:  # report, keep the process: the parent decides
            import traceback

            traceback.print_exc()
            emit({"error": f"{type(exc).__name__}: {exc}"[:500]})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument(
        "--ladder", default=None, help="rungs, comma-separated, keys joined by '+' (default: cumulative)"
    )
    parser.add_argument("--preset", default="0.8b", help="a preset of bench/mfu.py (30m is the CPU workload)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quantization", choices=["none", "4bit"], default="none")
    parser.add_argument("--unsloth-target", type=Path, default=None, help="pip --target dir with Unsloth's stack")
    parser.add_argument("--unsloth-cpu", action="store_true", help="run unsloth without CUDA (its CPU fallback)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a worker may take for one command")
    parser.add_argument("--warmup-parallel", type=int, default=1, help="warm-ups at a time (each holds a batch)")
    parser.add_argument(
        "--deadline",
        type=float,
        default=0,
        help="seconds after which no new round starts (0: none); the JSON still comes",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autotuning-compare")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return main_worker(args.worker)
    if args.unsloth_target is not None:
        args.unsloth_target = args.unsloth_target.resolve()
    return main_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
