"""Start the autotuning web app: `python app.py` (local), `--share` (Colab), or as a Hugging Face Space."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from huggingface_hub import constants

from autotuning.config import lend_environment_token
from autotuning.pipeline import MainThreadExecutor
from ui import ASSETS, AppContext, build_app, theme


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="autotuning: fine-tune causal language models in the browser.")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="interface to listen on (env GRADIO_SERVER_NAME; 0.0.0.0 to serve other machines)",
    )
    # Hugging Face Spaces and container hosts say where to listen through the environment; a flag given wins.
    env_port = os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or "7860"
    parser.add_argument("--port", type=int, default=None, help="port (env PORT or GRADIO_SERVER_PORT; default 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link (Colab)")
    parser.add_argument(
        "--auth",
        metavar="USER:PASS",
        default=os.environ.get("AUTOTUNING_AUTH"),
        help="require this login (env AUTOTUNING_AUTH)",
    )
    parser.add_argument(
        "--lend-hf-token",
        action="store_true",
        help="let browser sessions use this machine's HF_TOKEN (and stored Hugging Face login) when their own "
        "token field is empty; without it they use only the token they type (or, on a Space with OAuth, "
        "their own Hugging Face login)",
    )
    parser.add_argument(
        "--allow-remote-code",
        action="store_true",
        help="let browser sessions turn on trust_remote_code and allow_pickle_weights (both can run code here)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow --share without --auth: anyone with the link can train, read runs and use the server's files",
    )
    parser.add_argument(
        "--output-root",
        default=os.environ.get("AUTOTUNING_OUTPUT_ROOT", "runs"),
        help="directory where runs are saved and listed (env AUTOTUNING_OUTPUT_ROOT; default ./runs)",
    )
    parser.add_argument(
        "--data-dir",
        dest="data_dirs",
        action="append",
        default=[d for d in os.environ.get("AUTOTUNING_DATA_DIRS", "").split(os.pathsep) if d],
        metavar="DIR",
        help="a folder whose files may be typed as a dataset path in the app (repeatable; env AUTOTUNING_DATA_DIRS). "
        "Without it the app reads local data only from uploads",
    )
    args = parser.parse_args(argv)
    if args.port is None:
        if not env_port.isdigit() or not 0 < int(env_port) < 65536:
            parser.error(f"PORT / GRADIO_SERVER_PORT is {env_port!r}, not a port number")
        args.port = int(env_port)
    return args


def check_access(args: argparse.Namespace) -> tuple[tuple[str, str] | None, list[str]]:
    """(login or None, warnings) for how the app will be reachable; ValueError for a malformed --auth, and for
    --share without --auth (a public link to a machine's files and compute) unless --insecure says so."""
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth expects user:password")
        auth = (user, password)
    warnings = []
    if auth is None and args.share:
        if not args.insecure:
            raise ValueError(
                "--share without --auth would let anyone with the link use this machine: add --auth user:password "
                "(or --insecure to accept that)"
            )
        warnings.append("--share without --auth (--insecure): the app is public to anyone with the link")
    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(
            f"--host {args.host} without --auth lets anyone on the network use the app: add --auth user:password"
        )
    return auth, warnings


def apply_token_policy(args: argparse.Namespace) -> str | None:
    """Unless --lend-hf-token: configs built by this app do not fall back to HF_TOKEN, and huggingface_hub sends
    no token it was not given (HF_HUB_DISABLE_IMPLICIT_TOKEN), so a visitor's request never runs with the
    owner's login. Returns a note to print when a server token is being withheld."""

    lend_environment_token(args.lend_hf_token)
    if args.lend_hf_token:
        return None

    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # for processes this one starts (multi-GPU runs)
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # read at each request; the environment only at import
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "this machine's HF_TOKEN is not lent to browser sessions (start with --lend-hf-token to lend it)"
    return None


def _is_interactive() -> bool:
    """A notebook or a Python prompt: the caller keeps its thread, so the app must not block it."""
    return bool(getattr(sys, "ps1", sys.flags.interactive)) or "ipykernel" in sys.modules


def main(argv: list[str] | None = None):
    """`python app.py ARGS`; from a notebook, ``app.main(["--share", "--auth", "user:pass"])``.

    Returns the running ``gr.Blocks``: in a notebook ``launch()`` returns at once and ``demo.close()`` stops the app.
    Run as a program, the main thread then trains the jobs the app starts (faster than a side thread on a
    CPU: see ``autotuning.pipeline.MainThreadExecutor``) until the server closes or Ctrl-C.
    """
    args = parse_args(argv)
    try:
        auth, warnings = check_access(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    note = apply_token_policy(args)
    if note:
        print(f"note: {note}", file=sys.stderr)
    logging.basicConfig(level=logging.WARNING)

    ctx = AppContext.create(args.output_root, args.data_dirs, allow_code=args.allow_remote_code)
    serve_jobs = not _is_interactive()
    if serve_jobs:
        ctx.pipeline.executor = MainThreadExecutor()
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        theme=theme(),
        css=(ASSETS / "style.css").read_text(encoding="utf-8"),
        favicon_path=str(ASSETS / "logo.svg"),
        # Run files (exports, reports) are served from the output root; other people's uploads are not.
        allowed_paths=[str(ctx.output_root)],
        blocked_paths=[str(ctx.workspace)],
        prevent_thread_lock=serve_jobs,  # the main thread serves training jobs instead of sleeping
    )
    if serve_jobs:
        try:
            ctx.pipeline.executor.serve(keep_going=lambda: demo.is_running)
        except KeyboardInterrupt:
            print("Keyboard interruption in main thread... closing server.", file=sys.stderr)
        finally:
            demo.close()
    return demo


if __name__ == "__main__":
    main()
