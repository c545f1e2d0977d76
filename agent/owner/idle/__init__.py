"""Is someone at the machine? One monitor (``monitor``) over three sources: input devices
(``input``), logind sessions (``logind``) and the X11 screen saver (``x11``)."""
