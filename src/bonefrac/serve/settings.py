"""What an operator of `bonefrac serve` may set, with the defaults: the one place the CLI's options and the app read
them from (light to import: the CLI builds its parser from it without loading FastAPI or torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeSettings:
    """What an operator may set; the defaults are safe for a workstation."""

    backend: str = "auto"  # auto: onnxruntime when RUN/model.onnx is current, else PyTorch
    max_upload_mb: float = 50.0  # per file; larger uploads get 413
    max_files: int = 16  # per /v1/predict/batch request
    # What one request may make the server hold or decode; beyond each, 413 with the reason (docs/SERVE.md).
    max_body_mb: float = 200.0  # the whole body, every part and field, chunked or not; counted as it streams in
    max_fields: int = 16  # form fields (parts without a file name); the API reads 3 (operating_point, ...)
    max_field_kb: float = 64.0  # each form field
    max_request_mpx: float = 200.0  # the images of one request together, in megapixels, from their headers
    request_timeout_s: float = 60.0  # upload + queue + inference; past it, 503
    # Requests held at once, from reading their body to their answer (the model thread takes one at a time; the
    # others wait with their uploads in memory): one more gets 503 + Retry-After before its body is read, so the
    # uploads in flight never exceed max_requests x max_body_mb (uploads.Admission).
    max_requests: int = 8
    inference_threads: int = 1  # model calls at a time (more only helps with more cores than one call uses)
    display_side: int = 1024  # longest side of the PNGs returned for the page (image, heatmap, overlay)
    heatmap_method: str = "gradcam"
    save_uploads: str | None = None  # a folder to keep every upload in (by its sha256); None: never written
    # Load truncated uploads (the decoder fills in the rest; the answer says truncated) instead of a 422 that names
    # --allow-truncated; None: as the run was trained (Run.allow_truncated).
    allow_truncated: bool | None = None
    # Host names answered (serve.hosts.allowed_hosts: `bonefrac serve` sets the bound host, localhost, 127.0.0.1, ::1
    # and --allowed-host); None: any (create_app called directly, as the tests and an embedding app do).
    allowed_hosts: tuple[str, ...] | None = None
    # The bearer token the /v1/ endpoints require (serve.auth); None: none (then `serve` binds to loopback only,
    # unless insecure). Kept out of repr so that it never reaches a log line or a traceback.
    token: str | None = field(default=None, repr=False)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def form_limits(self) -> dict[str, int]:
        """The body limits of uploads.read_form, in bytes, besides the number of files."""
        return {"max_file_bytes": self.max_file_bytes, "max_body_bytes": int(self.max_body_mb * 1e6),
                "max_fields": self.max_fields, "max_field_bytes": int(self.max_field_kb * 1e3)}
