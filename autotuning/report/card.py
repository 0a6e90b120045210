"""The model card: a README.md with Hugging Face metadata, beside merged/ and adapter/ and at the root of a pushed repo.

The YAML block is huggingface_hub's own (:class:`~huggingface_hub.ModelCardData`), so the Hub reads it as it reads any
card; the text comes from the same :class:`~.data.Report` the run report is built from: base model, dataset and its
fingerprint, method, metrics base vs fine-tuned, the export files with their sha256 and verification figures, how
to load the model, and the config (the token is never in it).

Only Hub ids go into the metadata (``base_model``, ``datasets``): the Hub refuses a card that names a model it does
not have, and llama.cpp's converter copies these fields into a GGUF made from merged/ (``general.base_model.*``).
Builtin models, local folders and local files are named in the text only. The card is rewritten with the report
(:func:`~.render.write_report`), so an export or an evaluation run again refreshes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from jinja2 import Environment, PackageLoader, StrictUndefined

from ..runs import RunDir, load_run_config
from .data import CARD_NAME, Report, build_report, fmt_value

__all__ = ["CARD", "PARTS", "CardPlace", "build_model_card", "local_parts", "write_model_cards"]

CARD = CARD_NAME
# What a run has to load or push, in the order a repo gets them (the first one pushed goes at its root).
PARTS = ("merged", "adapter", "gguf")
_REPORT_FORMAT = {"merged": "torch", "adapter": "adapter", "gguf": "gguf"}  # Report.files' name for each folder
# Counts in eval_results, not measures of quality: in the card's table, not in its model-index.
_COUNTS = re.compile(r"_(tokens|rows|samples|pairs)$")
_METHODS = {
    "sft": "supervised fine-tuning (SFT)",
    "dpo": "direct preference optimisation (DPO)",
    "orpo": "odds-ratio preference optimisation (ORPO)",
    "simpo": "simple preference optimisation (SimPO)",
    "kto": "Kahneman-Tversky optimisation (KTO)",
}


def _md_cell(value: Any) -> str:
    text = "–" if value is None else fmt_value(value)
    return text.replace("|", "\\|").replace("\n", " ")


_ENV = Environment(
    loader=PackageLoader("autotuning.report", "templates"),
    autoescape=False,  # Markdown: no HTML escaping (report.md does the same)
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters.update(md_cell=_md_cell)


@dataclass(frozen=True)
class CardPlace:
    """Where a card sits and where its loading snippets point.

    ``folders`` maps each part the card describes (merged, adapter, gguf) to its folder: a path on disk, or with
    ``repo_id`` a folder in that Hub repo ("" for its root). ``beside`` is the part the card is written next to
    (its folder holds the README), or "" for a repo's root card.
    """

    folders: dict[str, str]
    beside: str = ""
    repo_id: str | None = None


def local_parts(run: RunDir) -> dict[str, Path]:
    """The parts this run has on disk: merged/ (config.json), adapter/ (adapter_config.json), gguf/ (a .gguf)."""
    found = {}
    if (run.merged / "config.json").is_file():
        found["merged"] = run.merged
    if (run.adapter / "adapter_config.json").is_file():
        found["adapter"] = run.adapter
    gguf = run.path / "gguf"
    if gguf.is_dir() and any(gguf.glob("*.gguf")):
        found["gguf"] = gguf
    return found


def _hub_like(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith(("builtin:", "pkg:", ".", "~", "/"))


def _from_base(record: dict[str, Any], key: str) -> Any:
    """A field the job recorded about its base model (``base_model_id``, ``base_license``); a run chained on
    another run (``base_run``) has the first run's."""
    if record.get(key):
        return record[key]
    base_run = record.get("base_run")
    if base_run and (Path(base_run) / "run.json").is_file():
        return _from_base(RunDir(base_run).read(), key)
    return None


def _base_model_id(record: dict[str, Any]) -> str | None:
    """The base model's Hub id as the job recorded it; for runs recorded before the field existed, the model name
    when it reads as a Hub id."""
    found = _from_base(record, "base_model_id")
    if found:
        return found
    name = str(record.get("model_name") or "")
    if "base_model_id" not in record and _hub_like(name) and not Path(name).expanduser().exists():
        return name
    return None


def _dataset_id(record: dict[str, Any]) -> str | None:
    source = str((record.get("dataset") or {}).get("source") or "")
    return source.removeprefix("hub:") if source.startswith("hub:") else None


def _data_text(record: dict[str, Any]) -> str:
    ds = record.get("dataset") or {}
    source = str(ds.get("source") or "")
    if source.startswith("hub:"):
        hub_id = source.removeprefix("hub:")
        text = f"[{hub_id}](https://huggingface.co/datasets/{hub_id})"
    elif source.startswith("sample:"):
        text = f"autotuning's bundled sample `{source}`"
    else:
        text = f"a local dataset `{Path(source).name}`" if source else "unknown"
    return f"{text} ({ds['format']} format)" if ds.get("format") else text


def _method_text(report: Report, config) -> str:
    method = _METHODS.get(report.training_method, report.training_method)
    peft, quant = config.peft.peft_type.value, config.quantization.quantization.value
    p = config.peft
    lora = f"r {p.lora_r}, alpha {p.lora_alpha}, dropout {p.lora_dropout}, modules {', '.join(p.lora_target_modules)}"
    if peft == "qlora":
        tuning = f"QLoRA: LoRA ({lora}) on a 4-bit (nf4) base"
    elif peft == "lora":
        tuning = f"LoRA ({lora})" + (f" on a {quant} base" if quant != "none" else "")
    else:
        tuning = "full fine-tune (every weight trained)"
    return f"{method} of the {report.fine_tuning_type} kind, {tuning}"


def _tags(report: Report, config, parts: dict[str, str]) -> list[str]:
    peft = config.peft.peft_type.value
    tags = ["autotuning", "text-generation", report.training_method, "full-fine-tune" if peft == "none" else peft]
    if "adapter" in parts:
        tags.append("peft")
    if "gguf" in parts:
        tags.append("gguf")
    return tags


def _plain(markdown: str) -> str:
    """Markdown link and code marks dropped: ``[id](url)`` -> id."""
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", markdown).replace("`", "")


def _eval_results(report: Report, dataset_id: str | None, data_text: str) -> list[EvalResult]:
    """The fine-tuned model's figures as a model-index, for a Hub dataset only: the Hub links each result to its
    dataset (``dataset.type``), and a local file has no page to link to (its figures are in the card's table)."""
    if dataset_id is None:
        return []
    results = []
    for row in report.metrics:
        value = row["tuned"]
        if _COUNTS.search(row["metric"]) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset_id,
                dataset_name=f"held-out rows of {_plain(data_text)}",
                metric_type=row["metric"],
                metric_value=value,
                metric_name=row["metric"],
            )
        )
    return results


def _files(report: Report, place: CardPlace) -> list[dict[str, Any]]:
    """The files of the parts the card describes, each as the card's reader finds it (in the repo, or on disk)."""
    rows = []
    for part, folder in place.folders.items():
        for row in report.files:
            if row["format"] != _REPORT_FORMAT[part]:
                continue
            inside = Path(row["file"]).relative_to(part).as_posix()
            if inside == CARD:
                continue
            shown = "/".join(p for p in (folder, inside) if p) if place.repo_id is not None else row["file"]
            rows.append({"file": shown, "bytes": row["bytes"], "sha256": row["sha256"]})
    return rows


def _ref(place: CardPlace, part: str) -> str:
    """The first argument(s) of ``from_pretrained`` for a part: a repo id (and its subfolder), or a local path."""
    folder = place.folders[part]
    if place.repo_id is None:
        return repr(folder)
    return repr(place.repo_id) + (f", subfolder={folder!r}" if folder else "")


def _gguf_context(run: RunDir, place: CardPlace, record: dict[str, Any]) -> dict[str, Any]:
    if "gguf" not in place.folders:
        return {"gguf_files": [], "gguf_dir": "", "fetch": "", "ollama_name": ""}
    names = sorted(p.name for p in (run.path / "gguf").glob("*.gguf"))
    first = Path(str((record.get("exports") or {}).get("gguf", {}).get("path", ""))).name
    if first in names:  # the type gguf/Modelfile is for comes first
        names.remove(first)
        names.insert(0, first)
    folder = place.folders["gguf"]
    if place.repo_id is None:
        gguf_dir, fetch = folder.rstrip("/") + "/", ""
        name = run.path.name
    else:
        name = place.repo_id.split("/")[-1]
        what = f"{folder}/" if folder else '--include "*.gguf" --include "Modelfile*"'
        fetch = f"hf download {place.repo_id} {what} --local-dir {name}"
        gguf_dir = f"{name}/{folder}/" if folder else f"{name}/"
    ollama_name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"
    return {"gguf_files": names, "gguf_dir": gguf_dir, "fetch": fetch, "ollama_name": ollama_name}


# Config values that may be paths on this machine: in a repo's card they mean nothing and may name the user's
# folders, so an absolute path is shown by its last part there.
_LOCAL_PATHS = ("model_name", "dataset_path", "base_run", "output_dir")


def _config_yaml(config, place: CardPlace) -> str:
    """The run's config as YAML, by the config package's own redaction (``to_dict(redact=True)``: no token)."""
    grouped = config.to_dict(redact=True)
    if place.repo_id is not None:
        for values in grouped.values():
            for key in _LOCAL_PATHS:
                if isinstance(values.get(key), str) and Path(values[key]).is_absolute():
                    values[key] = Path(values[key]).name
    return yaml.safe_dump(grouped, sort_keys=False, allow_unicode=True).strip()


def _adapter_base(run: RunDir, place: CardPlace, base_id: str | None) -> str:
    if base_id:
        return repr(base_id)
    if place.repo_id is None:  # on this machine the adapter's own record of its base loads
        try:
            saved = json.loads((run.adapter / "adapter_config.json").read_text(encoding="utf-8"))
            return repr(saved["base_model_name_or_path"])
        except (OSError, KeyError, json.JSONDecodeError):
            pass
    return '"<the base model>"'


def build_model_card(run_dir: str | Path, place: CardPlace, report: Report | None = None) -> ModelCard:
    """The card of a run for ``place`` (a folder of the run, or a Hub repo); ``report`` saves reading the run again."""
    run = RunDir(run_dir)
    report = report if report is not None else build_report(run.path)
    record = run.read()
    config = load_run_config(run.path)
    base_id, dataset_id = _base_model_id(record), _dataset_id(record)
    data_text = _data_text(record)
    parts = place.folders
    if "merged" in parts:
        library = "transformers"
    elif "adapter" in parts:
        library = "peft"
    else:
        library = "gguf"
    if place.beside == "adapter":
        library = "peft"
    name = place.repo_id.split("/")[-1] if place.repo_id else report.name
    data = ModelCardData(
        base_model=base_id,
        license=_from_base(record, "base_license"),
        datasets=[dataset_id] if dataset_id else None,
        library_name=library,
        pipeline_tag="text-generation",
        tags=_tags(report, config, parts),
        model_name=name,
        eval_results=_eval_results(report, dataset_id, data_text) or None,
    )
    method = _method_text(report, config)
    base = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{report.model_name}` (not a Hub model)"
    verification = report.verification
    if place.repo_id is not None:  # only the exports this repo holds
        kinds = {"torch"} if {"merged", "adapter"} & set(parts) else set()
        kinds |= {"gguf"} if "gguf" in parts else set()
        verification = [row for row in verification if row["format"].split(":")[0] in kinds]
    names = [{"merged": "merged model", "adapter": "LoRA adapter", "gguf": "GGUF files"}[p] for p in parts]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    summary = (
        f"The {listed} of a fine-tune of {base} on {data_text}, made with autotuning."
        if parts
        else f"A fine-tune of {base} on {data_text}, made with autotuning."
    )
    body = _ENV.get_template("model_card.md.j2").render(
        title=place.repo_id or f"{report.name} ({place.beside or 'run'})",
        summary=summary,
        base=base,
        base_id=base_id,
        method=method,
        data=data_text,
        report=report,
        files=_files(report, place),
        verification=verification,
        merged=_ref(place, "merged") if "merged" in parts else "",
        adapter=_ref(place, "adapter") if "adapter" in parts else "",
        adapter_base=_adapter_base(run, place, base_id) if "adapter" in parts else "",
        config_text=_config_yaml(config, place),
        **_gguf_context(run, place, record),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_cards(run_dir: str | Path, report: Report | None = None) -> list[Path]:
    """(Re)write merged/README.md and adapter/README.md (where those folders hold a model); returns the paths.

    adapter/README.md replaces the template PEFT saves there, which names the base by a local path."""
    run = RunDir(run_dir)
    parts = local_parts(run)
    if not ({"merged", "adapter"} & set(parts)):
        return []
    report = report if report is not None else build_report(run.path)
    folders = {part: str(path) for part, path in parts.items()}
    written = []
    for part in ("merged", "adapter"):
        if part not in parts:
            continue
        card = build_model_card(run.path, CardPlace(folders=folders, beside=part), report)
        path = parts[part] / CARD
        tmp = path.with_name(f".{CARD}.tmp")
        card.save(tmp)
        tmp.replace(path)
        written.append(path)
    return written
