"""label_store: a chunked, compressed, verifiable store of dense teacher targets.

The public names below load on first use (PEP 562), so ``import label_store`` (and the
``distill`` CLI's ``--help``) stays cheap; no module of the package imports torch.

Writing::

    store = create_store(url, fingerprint, default_target_specs(...))
    with store.open_part("task-0007") as part:
        part.append(record, targets)          # record: image_id, view_id, view, content_hash, valid_region
        part.commit()

Reading::

    reader = open_store(url, expected_fingerprint=fingerprint)
    targets = reader.read(image_id, view_id)  # name -> float32 array[C, H, W]
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SCHEMA_VERSION": "label_store.schema",
    "DEFAULT_CODECS": "label_store.schema",
    "BASIS_FREE_CODECS": "label_store.schema",
    "TARGET_GROUPS": "label_store.schema",
    "LOSS_TARGET_GROUPS": "label_store.schema",
    "loss_target_groups": "label_store.schema",
    "TeacherFingerprint": "label_store.schema",
    "TargetSpec": "label_store.schema",
    "StoreRegion": "label_store.schema",
    "default_target_specs": "label_store.schema",
    "level_name": "label_store.schema",
    "ViewRecipe": "label_store.schema",
    "fit_target_bases": "label_store.schema",
    "TargetCodec": "label_store.codecs",
    "ChannelBasis": "label_store.codecs",
    "fit_channel_basis": "label_store.codecs",
    "parse_codec": "label_store.codecs",
    "encode_targets": "label_store.encoding",
    "decode_targets": "label_store.encoding",
    "QuantizedTarget": "label_store.encoding",
    "measure_fidelity": "label_store.fidelity",
    "choose_codecs": "label_store.fidelity",
    "LOSS_BUDGETS": "label_store.fidelity",
    "create_store": "label_store.writer",
    "Store": "label_store.writer",
    "PartWriter": "label_store.writer",
    "DEFAULT_VIEWS_PER_SHARD": "label_store.writer",
    "StoreFiller": "label_store.fill",
    "open_store": "label_store.reader",
    "read_store_targets": "label_store.reader",
    "StoreReader": "label_store.reader",
    "verify_store": "label_store.maintenance",
    "VerifyReport": "label_store.maintenance",
    "gc_store": "label_store.maintenance",
    "inspect_store": "label_store.maintenance",
    "StoreNotFoundError": "label_store.errors",
    "SchemaVersionError": "label_store.errors",
    "StoreMismatchError": "label_store.errors",
    "FingerprintMismatchError": "label_store.errors",
    "PartExistsError": "label_store.errors",
    "PartStateError": "label_store.errors",
    "ViewNotFoundError": "label_store.errors",
    "CorruptDataError": "label_store.errors",
    "StoreFormatError": "label_store.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'label_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
