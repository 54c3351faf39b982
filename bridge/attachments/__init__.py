"""Attachments: what an uploaded or posted file says, read within hard bounds.

``sniff`` tells the type from the bytes (no filename or content type is trusted), one small
module per format pulls its text out (``text``, ``markup``, ``pdf``, ``ooxml``, ``odf``),
``archive`` reads zip members while counting every inflated byte, ``extract`` dispatches
(recursively into archives), and ``pool`` runs it all in separate processes with a
wall-clock timeout and an address-space limit. ``decide`` turns an extraction and the DLP
rules into an outcome (pure).
"""
