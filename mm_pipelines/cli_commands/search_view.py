"""`mm search`: one line per hit (kind, score, file name, where in it, text), from a running
`mm serve` when one is configured (no model loading), else from the local index."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mm_pipelines import settings
from mm_pipelines.helpformat import Defaults


def clock(seconds: float | None) -> str:
    """63.25 -> `1:03.2`."""
    s = max(0.0, float(seconds or 0.0))
    return f"{int(s // 60)}:{s % 60:04.1f}"


def _where(hit: dict[str, Any]) -> str:
    kind = hit["kind"]
    if kind == "video":
        times = sorted({clock(m["timestamp_s"]) for m in hit.get("matched_frames", [])[:3]})
        via = " (caption)" if hit.get("matched_by") == "caption" else ""
        return f"at {', '.join(times) or clock(0)}{via}"
    if kind in ("speech", "sound"):
        return f"{clock(hit.get('start_s'))}-{clock(hit.get('end_s'))}"
    if kind == "image":
        return "(caption)" if hit.get("matched_by") == "caption" else "(pixels)"
    if kind == "text":
        return f"#{hit.get('chunk_index', 0)}"
    return ""


def hit_line(hit: dict[str, Any], width: int = 100) -> str:
    """One line, never more: newlines in texts are spaces, long lines end in `…`."""
    name = hit.get("name") or (hit.get("source_uri") or "").rsplit("/", 1)[-1]
    line = f"  {hit['kind']:<6} {hit['score']:.3f}  {name}  {_where(hit)}"
    if hit.get("text") and hit["kind"] in ("speech", "text"):
        line += f'  "{" ".join(hit["text"].split())}"'
    return line if len(line) <= width else line[: width - 1] + "…"


def print_hits(results: dict[str, Any], out=sys.stdout) -> None:
    width = max(60, shutil.get_terminal_size((100, 20)).columns)
    hits = results.get("hits", [])
    if not hits:
        print("  (no hits)", file=out)
    for hit in hits:
        print(hit_line(hit, width), file=out)


# --------------------------------------------------------------------------- searching


class ServerUnavailable(RuntimeError):
    pass


def served_search(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """POST /v1/search to a running `mm serve`; ServerUnavailable when it cannot be reached,
    ValueError with the server's message for a refused query."""
    headers = {"Content-Type": "application/json"}
    if key := settings.api_key():
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/search", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not our JSON: say what came back
            message = f"HTTP {err.code}"
        if err.code >= 500:
            raise ServerUnavailable(f"{url}: {message}") from err
        raise ValueError(message) from err
    except (urllib.error.URLError, OSError) as err:
        raise ServerUnavailable(f"{url}: {getattr(err, 'reason', err)}") from err


def file_query(path: Path) -> dict[str, str]:
    """An image, audio or video file as the extension fields of a served search."""
    import filetype

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    kind = filetype.guess(str(path))
    mime = kind.mime if kind else "unknown"
    data = base64.b64encode(path.read_bytes()).decode()
    if mime.startswith("image/"):
        return {"image_base64": data}
    if mime.startswith(("audio/", "video/")):
        return {"audio_base64": data}
    raise ValueError(f"{path}: unsupported query format ({mime}); use an image or audio file")


def local_search(args: argparse.Namespace, query: str | Path) -> dict[str, Any]:
    from mm_pipelines.pipeline.search import QueryModels, search
    from mm_pipelines.pipeline.services import Services
    from mm_pipelines.storage.postgres import connect

    svc = Services.from_settings()
    models = QueryModels.from_services(svc)
    with connect(svc.need_dsn()) as conn:
        results = search(
            conn, models, query, args.k, args.tenant, args.batch, args.modality, args.min_score
        )
    return results.as_dict()


def run(args: argparse.Namespace) -> int:
    from mm_pipelines.pipeline.search import SearchError

    query: str | Path = Path(args.file) if args.file else " ".join(args.query)
    if not args.file and not str(query).strip():
        print("mm search: give query text or --file PATH", file=sys.stderr)
        return 2
    url = "" if args.server == "none" else (args.server or settings.serve_url() or "")
    results = None
    try:
        if url:
            if not args.tenant:
                print(
                    f"mm search: the server at {url} answers per tenant: give --tenant "
                    "(or set MM_TENANT), or --server none to search the local index",
                    file=sys.stderr,
                )
                return 2
            body: dict[str, Any] = {"tenant": args.tenant, "k": args.k, "min_score": args.min_score}
            body.update(file_query(query) if isinstance(query, Path) else {"query": query})
            if args.batch:
                body["batches"] = args.batch
            if args.modality:
                body["modalities"] = args.modality
            try:
                results = served_search(url, body)
                print(f"(answered by mm serve at {url}, bundle {results.get('bundle_version')})",
                      file=sys.stderr)  # fmt: skip
            except ServerUnavailable as err:
                print(f"mm search: {err}; searching the local index", file=sys.stderr)
        if results is None:
            results = local_search(args, query)
    except (SearchError, ValueError, FileNotFoundError) as err:
        print(f"mm search: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print_hits(results)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="cross-modal search: one ranked list of images, video moments, speech, texts",
        formatter_class=Defaults,
    )
    p.add_argument("query", nargs="*", help="query text")
    p.add_argument(
        "--file", help="an image, audio or video file as the query (default: the query text)"
    )
    p.add_argument("-k", type=int, default=10, help="hits in the ranked list")
    p.add_argument(
        "--tenant",
        default=settings.default_tenant(),
        help="only this tenant's media; required through a server (default: MM_TENANT, else "
        "every tenant)",
    )
    p.add_argument(
        "--batch", action="append", help="only these batches, repeatable (default: every batch)"
    )
    p.add_argument(
        "--modality",
        action="append",
        choices=["image", "video", "audio", "text"],
        help="only media of these modalities, repeatable (default: every modality)",
    )
    p.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        help="leave out hits scoring below this (calibrated 0..1, comparable across kinds)",
    )
    p.add_argument(
        "--server",
        default=None,
        help="a running `mm serve` to ask instead of loading the models here; 'none': the "
        "local index (default: MM_SERVE_URL, else the local index)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)
