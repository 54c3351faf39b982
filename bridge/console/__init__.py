"""The compliance console: a server-rendered web UI over the archive (issue 15).

``web`` holds the aiohttp application (login, sessions, CSRF, pages), ``readmodel`` the
queries, ``charts`` the SVG geometry, ``exporting`` the streamed downloads, ``homeserver``
the login calls, ``sessions`` and ``security`` the session and web-security primitives;
``services`` is the seam to the running bridge. See docs/console.md.
"""
