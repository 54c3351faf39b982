"""End-to-end encryption: the bot as an E2EE member of encrypted rooms.

Everything cryptographic sits behind one seam, :class:`bridge.e2ee.seam.RoomCrypto`;
:mod:`bridge.e2ee.olm` implements it with mautrix's ``OlmMachine`` (python-olm / libolm).
A vodozemac implementation can replace it without touching the pipeline (docs/e2ee.md).
"""
