"""Small service programs that tests/test_service.py runs under `fdmig run`, each
speaking systemd's conventions through libsystemd itself (see libsd)."""
