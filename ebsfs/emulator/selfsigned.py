"""A throwaway certificate for the emulator's HTTPS mode (tests, benchmarks, demos).

Made with the `openssl` command, so the emulator needs no crypto library of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """Write a self-signed certificate for `host` (and localhost) and its key into
    `directory`; return (certificate, key). Clients trust it via AWS_CA_BUNDLE."""
    cert, key = directory / "emulator-cert.pem", directory / "emulator-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={host}",
            "-addext",
            f"subjectAltName=IP:{host},DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
