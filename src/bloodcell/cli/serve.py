"""`bloodcell serve`: the review workstation and the JSON API on one port."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import DEVICE_HELP, MODEL_HELP, app, user_errors
from bloodcell.errors import BloodcellError
from bloodcell.serve.limits import HELP as SERVE_HELP
from bloodcell.serve.limits import ServerLimits

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.


@app.command("serve")
@user_errors
def serve_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help=MODEL_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Interface to bind; 0.0.0.0 exposes the server to the network.",
    ),
    port: int = typer.Option(
        8000,
        "--port",
        min=0,
        max=65535,
        help="0 lets the system pick a free port (printed on start).",
    ),
    detector: Optional[Path] = typer.Option(
        None,
        "--detector",
        help="Detector folder or its .onnx for smear photographs (default: the bundled one).",
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        "--data-dir",
        help="Folder of the review workstation's database "
        "(default: $BLOODCELL_DATA_DIR, else the user's data folder, e.g. ~/.local/share/bloodcell).",
    ),
    allow_host: List[str] = typer.Option([], "--allow-host", help=SERVE_HELP["allow_host"]),
    max_upload_mb: float = typer.Option(
        ServerLimits.max_upload_bytes / 2**20, "--max-upload-mb", min=0.001, help=SERVE_HELP["max_upload_mb"]
    ),
    max_files: int = typer.Option(ServerLimits.max_files, "--max-files", min=1, help=SERVE_HELP["max_files"]),
    max_pixels: int = typer.Option(ServerLimits.max_pixels, "--max-pixels", min=1, help=SERVE_HELP["max_pixels"]),
    max_request_pixels: int = typer.Option(
        ServerLimits.max_request_pixels, "--max-request-pixels", min=1, help=SERVE_HELP["max_request_pixels"]
    ),
    heavy_workers: int = typer.Option(
        ServerLimits.heavy_workers, "--heavy-workers", min=1, help=SERVE_HELP["heavy_workers"]
    ),
    heavy_queue: int = typer.Option(ServerLimits.heavy_queue, "--heavy-queue", min=0, help=SERVE_HELP["heavy_queue"]),
    header_seconds: float = typer.Option(
        ServerLimits.header_seconds, "--header-seconds", min=0.1, help=SERVE_HELP["header_seconds"]
    ),
    body_idle_seconds: float = typer.Option(
        ServerLimits.body_idle_seconds, "--body-idle-seconds", min=0.1, help=SERVE_HELP["body_idle_seconds"]
    ),
    body_seconds: float = typer.Option(
        ServerLimits.body_seconds, "--body-seconds", min=0.1, help=SERVE_HELP["body_seconds"]
    ),
) -> None:
    """Serve the model: the review workstation at / (samples kept in --data-dir), a one-off page at /classify,
    JSON API at /api, /predict and /explain, docs at /docs. Limits: bloodcell/serve/limits.py, docs/reliability.md."""
    from bloodcell.infer import Predictor
    from bloodcell.review.records import default_data_dir

    predictor = Predictor.load(model, max_pixels=max_pixels, device=device)
    _check_detector_seal(detector)  # the detector loads with the first photograph; its seal is checked now
    data_dir = data_dir or default_data_dir()
    limits = ServerLimits(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_files=max_files,
        max_pixels=max_pixels,
        max_request_pixels=max_request_pixels,
        heavy_workers=heavy_workers,
        heavy_queue=heavy_queue,
        header_seconds=header_seconds,
        body_idle_seconds=body_idle_seconds,
        body_seconds=body_seconds,
        allowed_hosts=_served_names(host, allow_host),
    )
    _listen_and_serve(predictor, detector, data_dir, limits, host, port)


def _listen_and_serve(
    predictor, detector: Optional[Path], data_dir: Path, limits: ServerLimits, host: str, port: int
) -> None:
    """Build the app, bind host:port, say where it listens, and serve until stopped.

    Args:
        predictor: the loaded model (bloodcell.infer.Predictor).
        detector: --detector as given (None: the bundled one).
        data_dir: the review database's folder.
        limits: the server's limits, its Host names among them.
        host, port: where to listen (--host, --port; port 0 lets the system pick).
    """
    from bloodcell.serve.app import create_app
    from bloodcell.serve.server import run

    app_ = create_app(predictor, detector=detector, data_dir=data_dir, limits=limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: binding {host}: anyone who can reach this machine can upload images; no authentication", err=True
        )
    sock = _bound_socket(host, port)  # bound here, so the line below names the real port even for --port 0
    url_host = f"[{host}]" if ":" in host else host
    typer.echo(
        f"bloodcell: model {predictor.model_name} ({predictor.backend}) "
        f"on http://{url_host}:{sock.getsockname()[1]}/ "
        f"(samples kept in {data_dir}; answers to {', '.join(limits.allowed_hosts)})",
        err=True,
    )
    run(app_, sock, limits)


def _check_detector_seal(detector: Optional[Path]) -> None:
    """A server must not start on a detector folder that was changed since it was sealed (models.seal); a folder or
    file that is not there is left to the first photograph's one-line error, as before."""
    from bloodcell.detect.registry import bundled_detector_dir
    from bloodcell.models.seal import verify

    folder = bundled_detector_dir() if detector is None or str(detector) == "default" else Path(detector)
    folder = folder.parent if folder.is_file() else folder
    if folder.is_dir():
        verify(folder)


def _served_names(host: str, extra: List[str]) -> tuple[str, ...]:
    """The Host names the server answers to: the local ones, the bound address, this machine's names when it binds
    every interface, and --allow-host."""
    import socket

    from bloodcell.serve.limits import LOCAL_HOSTS

    names = [*LOCAL_HOSTS, host]
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
        try:
            names += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            pass
    names += [h.strip() for h in extra if h.strip()]
    return tuple(dict.fromkeys(n for n in names if n not in ("0.0.0.0", "::", "")))


def _bound_socket(host: str, port: int):
    """A socket bound to host:port before the server starts: a port in use is a one-line error, and port 0's
    choice can be printed."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise BloodcellError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
