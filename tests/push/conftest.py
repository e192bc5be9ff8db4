"""The push tests' fixtures (defined in tests/push/fixtures.py, so other packages can import
them too)."""

from tests.push.fixtures import (  # noqa: F401
    fake_apns,
    fake_fcm,
    fake_webhook,
    key_dir,
    push_clock,
    push_tls,
)
