"""The desktop tray app (``gpu-agent-tray``): a client of the daemon's control socket only.

Pure parts, tested without Qt: :mod:`agent.tray.present` (a state to an icon, a tooltip
and the menu's enabled items), :mod:`agent.tray.notices` (which changes deserve a desktop
notification) and :mod:`agent.tray.form` (the settings window's text fields). The Qt
parts: :mod:`agent.tray.bridge` (the control client on an asyncio loop in its own thread,
talking to Qt through signals), :mod:`agent.tray.app` (the icon and its menu),
:mod:`agent.tray.windows` (settings and log windows), :mod:`agent.tray.icons` (drawn, no
files) and :mod:`agent.tray.main` (the console script).

PySide6 comes with the ``[tray]`` extra; nothing here imports ``hal`` or ``sandbox``.
"""
