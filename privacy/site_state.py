"""A site's signing key and privacy ledger, created together and kept bound to each other.

Standard library, ``cryptography`` and the ledger only: ``fedgov site init``, the SuperNode-free
CLI paths and the simulated SecAgg+ roster open a site's state without loading torch.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.ledger import LedgerError, LedgerState, SiteLedger
from privacy.receipts import PRIVATE_KEY_FILE, create_site_key, load_site_key, public_key_bytes


def open_site_state(site_dir: Path, site_id: str) -> tuple[Ed25519PrivateKey, SiteLedger]:
    """The site's signing key and ledger, initialising both on first use.

    Initialisation writes an empty ledger first, then the key, then binds the ledger to the key,
    so a crash part-way leaves a state this function completes. A key without a ledger means the
    ledger was lost (:class:`LedgerError`); so does a ledger with spends but no key, or a ledger
    bound to another key.
    """
    ledger = SiteLedger(site_dir, site_id, PRIVATE_KEY_FILE)
    key_path = Path(site_dir) / PRIVATE_KEY_FILE
    with ledger.locked():
        if not ledger.exists() and not key_path.exists():
            ledger.write(LedgerState(site_id=site_id))
        state = ledger.read()  # raises LedgerError when missing with a key, or unreadable
        if key_path.exists():
            try:
                key = load_site_key(site_dir)
            except (OSError, ValueError) as error:
                raise LedgerError(f"site key {key_path} is unreadable ({error})") from None
        elif state.spends:
            raise LedgerError(
                f"site key {key_path} is missing but the ledger holds spends; restore the key"
            )
        else:
            key = create_site_key(site_dir)
        public = public_key_bytes(key).hex()
        if not state.public_key:
            state.public_key = public
            ledger.write(state)
        elif state.public_key != public:
            raise LedgerError(f"privacy ledger {ledger.path} is bound to another site key")
    return key, ledger
