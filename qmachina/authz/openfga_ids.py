"""Which store and model of the OpenFGA server a deployment uses.

``qmachina authz bootstrap`` records them in ``<data_dir>/openfga.json`` together with the
server they belong to; ``OPENFGA_STORE_ID`` and ``OPENFGA_MODEL_ID``, when set, take precedence
(set both or neither). The file names the server without credentials, and ids recorded for
another server are refused rather than sent to the wrong one.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from qmachina.authz.authorizer import OpenFgaConfigError, OpenFgaIds, is_ulid, redacted_url

IDS_FILE_NAME = "openfga.json"


def ids_file(data_dir: Path) -> Path:
    """Where the ids are recorded for the deployment whose data lives in ``data_dir``."""
    return data_dir / IDS_FILE_NAME


def record_openfga_ids(data_dir: Path, api_url: str, ids: OpenFgaIds) -> Path:
    """Record ``ids`` as the store and model of the server at ``api_url``; returns the file."""
    path = ids_file(data_dir)
    document = {
        "api_url": redacted_url(api_url),
        "store_id": ids.store_id,
        "model_id": ids.model_id,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(partial, path)  # a reader never sees half a file
    return path


def recorded_openfga_ids(data_dir: Path, api_url: str) -> OpenFgaIds | None:
    """The ids recorded for the server at ``api_url``; None if none were recorded.

    Raises :class:`OpenFgaConfigError` for an unreadable file, one missing an id or holding an
    invalid one, or ids recorded for another server.
    """
    path = ids_file(data_dir)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise OpenFgaConfigError(
            f"{path}: cannot read the recorded OpenFGA ids: {error}"
        ) from error
    if not isinstance(document, dict):
        raise OpenFgaConfigError(f"{path}: expected a JSON object")
    for key in ("store_id", "model_id"):
        value = document.get(key)
        if not isinstance(value, str) or not is_ulid(value):
            raise OpenFgaConfigError(f"{path}: {key} is {value!r}, not a ULID")
    recorded_for = document.get("api_url")
    if recorded_for != redacted_url(api_url):
        raise OpenFgaConfigError(
            f"{path}: the ids were recorded for the OpenFGA server {recorded_for!r}, not "
            f"{redacted_url(api_url)!r}: run `qmachina authz bootstrap` for this server or set "
            "OPENFGA_STORE_ID and OPENFGA_MODEL_ID"
        )
    return OpenFgaIds(store_id=document["store_id"], model_id=document["model_id"])


def resolve_openfga_ids(
    api_url: str, store_id: str | None, model_id: str | None, data_dir: Path
) -> OpenFgaIds:
    """The ids to use: the configured pair, else the pair recorded in ``data_dir``."""
    if store_id and model_id:
        return OpenFgaIds(store_id=store_id, model_id=model_id)
    if store_id or model_id:
        missing = "OPENFGA_MODEL_ID" if store_id else "OPENFGA_STORE_ID"
        raise OpenFgaConfigError(
            f"OpenFGA at {redacted_url(api_url)}: {missing} is not set; set OPENFGA_STORE_ID "
            "and OPENFGA_MODEL_ID together, or neither to use the ids recorded by "
            "`qmachina authz bootstrap`"
        )
    recorded = recorded_openfga_ids(data_dir, api_url)
    if recorded is None:
        raise OpenFgaConfigError(
            f"OpenFGA at {redacted_url(api_url)}: no store is configured: run "
            f"`qmachina authz bootstrap` (it records the ids in {ids_file(data_dir)}) or set "
            "OPENFGA_STORE_ID and OPENFGA_MODEL_ID"
        )
    return recorded
