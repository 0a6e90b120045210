"""Push a finished run to a Hugging Face Hub repo: the merged model, the LoRA adapter and/or the GGUF files, with a
model card at the repo's root.

Layout: the first part pushed, in the order merged, adapter, gguf, sits at the repo's root, so the usual
``from_pretrained("user/name")`` loads it; the others go in a folder named after them (``adapter/``, ``gguf/``).
Pushing merged + adapter + gguf gives the merged model at the root, ``adapter/`` and ``gguf/`` (with its Modelfile,
whose ``FROM ./model-<type>.gguf`` stays true). Each part is one ``upload_folder`` (one commit; with ``hf_xet``
installed huggingface_hub may split a large folder into several), then the root README.md, a card made for the repo
whose snippets load from it, goes last, once everything it names is there. The run's own cards (merged/README.md,
adapter/README.md, which point at paths on this machine) and hidden files stay home.

A new repo is private unless asked otherwise; an existing one keeps its visibility (the Hub does not change it on
create). The token is the user's own (the CLI's HF_TOKEN or saved login, the app's typed token or Space login) and
is sent to the Hub only. The push holds the run's lock: a run being trained is refused, and a push waits for an
export of the run to end, so it never uploads a half-written folder.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import JobCancelled, UserError
from .hub import hub_offline_requested
from .report.card import CARD, CardPlace, build_model_card, local_parts
from .runs import Operation, RunDir, RunLock, RunStatus

__all__ = ["Part", "parse_parts", "push_run", "repo_layout"]

log = logging.getLogger("autotuning")


class Part(str, enum.Enum):
    """What of a run goes to the Hub; the order is the layout's (the first pushed sits at the root)."""

    MERGED = "merged"
    ADAPTER = "adapter"
    GGUF = "gguf"

    def __str__(self) -> str:
        return self.value


# What to do about a part the run lacks.
_EXPORT_FIRST = {
    Part.MERGED: "export it first with: python -m autotuning export --run {run} --format torch",
    Part.ADAPTER: "a full fine-tune (peft_type none) has no adapter: push merged instead",
    Part.GGUF: "export it first with: python -m autotuning export --run {run} --format gguf",
}


def parse_parts(what: str | Iterable[str] | None) -> list[Part] | None:
    """``"adapter,merged"`` or a list of names -> parts in layout order; None (or empty) means all the run has."""
    if what is None:
        return None
    names = [n.strip().lower() for n in (what.split(",") if isinstance(what, str) else what) if str(n).strip()]
    if not names:
        return None
    unknown = [n for n in names if n not in Part._value2member_map_]
    if unknown:
        raise UserError(
            f"unknown part to push: {', '.join(unknown)}",
            "--what",
            f"use one or more of {', '.join(p.value for p in Part)}, separated by commas",
        )
    return [p for p in Part if p.value in names]


def repo_layout(parts: Iterable[Part]) -> dict[Part, str]:
    """part -> its folder in the repo: "" (the root) for the first in layout order, its own name for the others."""
    ordered = [p for p in Part if p in set(parts)]
    return {p: ("" if i == 0 else p.value) for i, p in enumerate(ordered)}


def _check_repo_id(repo_id: str) -> str:
    repo_id = (repo_id or "").strip()
    try:
        if not repo_id or repo_id.count("/") > 1:
            raise HFValidationError("expected 'name' or 'owner/name'")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(
            f"'{repo_id}' is not a Hub repo id ({str(exc).splitlines()[0]})",
            "--repo",
            "use owner/name: your user or organisation name, a slash, then letters, digits, '-', '_' or '.' "
            "(at most 96 characters)",
        ) from None
    return repo_id


def _check_token(token: str | None) -> str:
    token = (token or "").strip()
    if not token:
        raise UserError(
            "no Hugging Face token to push with",
            "HF_TOKEN",
            "make a token with write access at https://huggingface.co/settings/tokens and set HF_TOKEN to it "
            "(or run `hf auth login`); in the app, type it in the token field or sign in",
        )
    return token


# Left out of every part: the run's own card (its snippets point at paths on this machine; the repo gets a card of
# its own) and hidden files (the report's checksum cache, lock files). Patterns are matched from the part's folder.
_NOT_PUSHED = ["README.md", ".*", "*/.*"]


def _files(run: RunDir, part: Part, folder: str) -> list[tuple[Path, str]]:
    """(local file, path in the repo) for one part, as upload_folder picks them with ``_NOT_PUSHED``."""
    root = run.path / part.value
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        inside = path.relative_to(root)
        if inside.as_posix() == CARD or any(bit.startswith(".") for bit in inside.parts):
            continue
        out.append((path, f"{folder}/{inside.as_posix()}" if folder else inside.as_posix()))
    return out


def _repo_card(run: RunDir, layout: dict[Part, str], repo_id: str) -> ModelCard | None:
    """The repo's root card, or None (a warning) where it cannot be made: the weights are worth pushing anyway."""
    try:
        return build_model_card(run.path, CardPlace(folders={p.value: f for p, f in layout.items()}, repo_id=repo_id))
    except Exception as exc:  # a view of the run's records; the push goes on without it
        log.warning("pushing without a model card, it could not be made: %s: %s", type(exc).__name__, exc)
        return None


def _hub_error(exc: HfHubHTTPError, repo_id: str) -> UserError:
    status = exc.response.status_code if exc.response is not None else None
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if status == 401:
        return UserError(
            f"the Hub refused the token ({first})", "HF_TOKEN", "check the token, or make a new one with write access"
        )
    if status == 403:
        return UserError(
            f"the token may not write to {repo_id} ({first})",
            "--repo",
            "use a token with write access to that user or organisation (a fine-grained token needs 'write' on it)",
        )
    return UserError(f"the Hub answered {status or 'an error'} while pushing to {repo_id} ({first})", "--repo", "")


def push_run(
    run_dir: str | Path,
    repo_id: str,
    token: str | None,
    what: str | Iterable[str] | None = None,
    *,
    private: bool = True,
    endpoint: str | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Push a finished run's ``what`` (merged, adapter, gguf; default: all the run has) to ``repo_id``.

    Returns what the CLI prints: the repo and its url, the commit, each part's folder in the repo, the files and
    bytes uploaded, and the exports that are not verified (pushed as they are, their card says so). ``endpoint`` is
    the Hub's address (default: HF_ENDPOINT or huggingface.co); the tests point it at a local server.
    """
    token = _check_token(token)
    repo_id = _check_repo_id(repo_id)
    wanted = parse_parts(what)
    run = RunDir(run_dir)
    if not (run.path / "run.json").is_file():
        raise UserError("not a run directory (no run.json)", str(run.path), "pick a directory made by a training run")
    say = progress or (lambda fraction, text: None)
    waiting = lambda owner: say(0.0, "waiting for an export of this run to finish")  # noqa: E731
    with RunLock(run.path, Operation.PUSH).acquire(wait=True, cancel=cancel, on_wait=waiting):
        record = run.read()
        status = record.get("status")
        if status != RunStatus.FINISHED.value:
            raise UserError(
                f"the run is {status or 'not finished'}: only a finished run is pushed",
                str(run.path),
                "train it to the end first (resume a stopped run with --resume)",
            )
        have = local_parts(run)
        parts = wanted if wanted is not None else [p for p in Part if p.value in have]
        missing = [p for p in parts if p.value not in have]
        if missing:
            raise UserError(
                f"no {missing[0].value}/ to push in {run.path}", "", _EXPORT_FIRST[missing[0]].format(run=run.path)
            )
        if not parts:
            raise UserError(
                f"nothing to push in {run.path} (no merged/, adapter/ or gguf/)",
                "",
                _EXPORT_FIRST[Part.MERGED].format(run=run.path),
            )
        if hub_offline_requested():  # after the checks above, which need no network
            raise UserError(
                "HF_HUB_OFFLINE is set, so nothing can be pushed", "HF_HUB_OFFLINE", "unset it and try again"
            )
        layout = repo_layout(parts)
        files = {part: _files(run, part, folder) for part, folder in layout.items()}
        size = sum(path.stat().st_size for items in files.values() for path, _ in items)
        api = HfApi(endpoint=endpoint, token=token)
        pushed, done = [], 0
        try:
            say(0.0, f"creating {repo_id}")
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            repo_id = url.repo_id  # "name" alone becomes the token owner's "user/name"
            # One commit per part, then the card, which names them all: it lands once they are all there.
            for part, folder in layout.items():
                if cancel is not None and cancel.is_set():
                    raise JobCancelled(
                        f"push cancelled before {part.value}",
                        repo_id,
                        f"pushed so far: {', '.join(p.value for p in layout if p.value in pushed) or 'nothing'}",
                    )
                part_bytes = sum(path.stat().st_size for path, _ in files[part])
                say(done / max(size, 1), f"uploading {part.value} ({part_bytes / 1e6:.1f} MB) to {repo_id}")
                info = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=run.path / part.value,
                    path_in_repo=folder or None,
                    commit_message=f"Upload {part.value} of run {run.path.name} (autotuning)",
                    ignore_patterns=list(_NOT_PUSHED),
                    repo_type="model",
                )
                pushed.append(part.value)
                done += part_bytes
            say(0.99, "writing the model card")
            card = _repo_card(run, layout, repo_id)
            if card is not None:
                info = api.upload_file(
                    path_or_fileobj=str(card).encode("utf-8"),
                    path_in_repo=CARD,
                    repo_id=repo_id,
                    commit_message=f"Model card of run {run.path.name} (autotuning)",
                    repo_type="model",
                )
        except HfHubHTTPError as exc:
            raise _hub_error(exc, repo_id) from None
        except ValueError as exc:  # the Hub's check of the card's metadata (validate-yaml) refused it
            raise UserError(f"the Hub refused the push to {repo_id} ({exc})", CARD, "please report it") from None
        except OSError as exc:  # httpx's connection errors are OSErrors too
            raise UserError(
                f"cannot reach the Hub at {api.endpoint} ({type(exc).__name__}: {exc})", "", "check the connection"
            ) from None
        kinds = ({"torch"} if Part.MERGED in layout else set()) | ({"gguf"} if Part.GGUF in layout else set())
        unverified = {
            fmt: figures.get("reason", "")
            for fmt, figures in (record.get("exports") or {}).items()
            if isinstance(figures, dict)
            and fmt.split(":")[0] in kinds
            and figures.get("status", "verified") != "verified"
        }
        for fmt, reason in unverified.items():
            log.warning("pushed the %s export as it is, UNVERIFIED (its card says so): %s", fmt, reason)
        result = {
            "repo": repo_id,
            "url": str(url),
            "private": private,
            "commit": info.oid,
            "commit_url": info.commit_url,
            "uploaded": {p.value: f or "/" for p, f in layout.items()},
            "files": [*([CARD] if card is not None else []), *(r for items in files.values() for _, r in items)],
            "bytes": size,
            "card": card is not None,
            "unverified": unverified,
        }
        pushes = list(record.get("hub_pushes") or [])
        pushes.append({k: result[k] for k in ("repo", "commit", "uploaded")} | {"at": time.time()})
        run.update(hub_pushes=pushes)
    log.info("pushed %s to %s (commit %s)", ", ".join(result["uploaded"]), result["url"], info.oid)
    say(1.0, "done")
    return result
