"""The update trust anchor: bundles, signatures, encryption, the dual-slot store.

Never imports edgeserve: the server depends on this package, not the other way.

Typical use by the server::

    keys = [load_master_key(settings.master_key_file)]
    policy = BundlePolicy(TrustedKeys.from_texts(settings.trusted_keys),
                          [read_unwrap_key(p) for p in settings.bundle_key_files])
    store = SlotStore(state_dir, keys, policy, max_unconfirmed_boots=3)
    store.record_boot("digits")                       # at each start
    manifest, files = store.load_current("digits")    # plaintext in memory only
    store.install(path, validate=load_and_run_samples)  # BundleRejected if refused
    store.confirm("digits") / store.rollback("digits", reason)
"""

from updater.atrest import (
    FileContext,
    decrypt_bytes,
    decrypt_to_bytes,
    encrypt_bytes,
    file_key_id,
    rotate_file,
    write_encrypted,
)
from updater.bundle import (
    BundlePolicy,
    RawBundle,
    VerifiedBundle,
    create_bundle,
    inspect_bundle,
    read_bundle,
    verify_bundle,
    write_bundle,
)
from updater.errors import (
    REJECT_REASONS,
    BundleRejected,
    DecryptionFailed,
    MasterKeyError,
    StoreError,
    UpdaterError,
)
from updater.health import HealthPolicy, HealthWatch, Verdict
from updater.journal import HistoryEntry, Journal, Pending, Probation, SlotRecord
from updater.manifest import (
    FileEntry,
    Manifest,
    SampleTensor,
    TensorSignature,
    ValidationSample,
    encode_manifest,
    parse_manifest,
)
from updater.masterkey import (
    MasterKey,
    generate_master_key_file,
    load_master_key,
    read_master_key_file,
)
from updater.samples import SampleMismatch, check_outputs, run_samples, sample_inputs
from updater.signing import (
    TrustedKeys,
    generate_signing_key,
    load_signing_key,
    parse_public_key,
    public_key_text,
    signing_key_id,
)
from updater.slots import InstallResult, SlotStore, Validator
from updater.wrapping import (
    DeviceKey,
    DevicePublicKey,
    FleetKey,
    generate_unwrap_key_file,
    read_unwrap_key,
    unwrap_key_text,
)

__all__ = [
    "REJECT_REASONS",
    "BundlePolicy",
    "BundleRejected",
    "DecryptionFailed",
    "DeviceKey",
    "DevicePublicKey",
    "FileContext",
    "FileEntry",
    "FleetKey",
    "HealthPolicy",
    "HealthWatch",
    "HistoryEntry",
    "InstallResult",
    "Journal",
    "Manifest",
    "MasterKey",
    "MasterKeyError",
    "Pending",
    "Probation",
    "RawBundle",
    "SampleMismatch",
    "SampleTensor",
    "SlotRecord",
    "SlotStore",
    "StoreError",
    "TensorSignature",
    "TrustedKeys",
    "UpdaterError",
    "ValidationSample",
    "Validator",
    "Verdict",
    "VerifiedBundle",
    "check_outputs",
    "create_bundle",
    "decrypt_bytes",
    "decrypt_to_bytes",
    "encode_manifest",
    "encrypt_bytes",
    "file_key_id",
    "generate_master_key_file",
    "generate_signing_key",
    "generate_unwrap_key_file",
    "inspect_bundle",
    "load_master_key",
    "load_signing_key",
    "parse_manifest",
    "parse_public_key",
    "public_key_text",
    "read_bundle",
    "read_master_key_file",
    "read_unwrap_key",
    "rotate_file",
    "run_samples",
    "sample_inputs",
    "signing_key_id",
    "unwrap_key_text",
    "verify_bundle",
    "write_bundle",
    "write_encrypted",
]
