"""The tray's icons, drawn with QPainter: a coloured disc with a white glyph per kind.

Shapes, not letters: they need no font, and read the same at 16 px as at 64 px.
"""

from __future__ import annotations

from typing import Final

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap, QPolygonF

from agent.tray.present import KINDS, Kind

__all__ = ["COLOURS", "icon", "pixmap"]

COLOURS: Final[dict[Kind, str]] = {
    "sharing": "#2e9d4a",  # green: ready for work
    "busy": "#2f6fd6",  # blue: a job runs
    "paused": "#e39b14",  # amber: held back, by the owner or a guard
    "offline": "#7a7f87",  # grey: no coordinator
    "error": "#d23b3b",  # red: the daemon cannot be reached
}
_SIZE: Final = 64
_cache: dict[Kind, QIcon] = {}


def icon(kind: Kind) -> QIcon:
    """The icon for ``kind`` (made once; needs a QGuiApplication)."""
    if kind not in _cache:
        drawn = QIcon()
        for size in (16, 22, 24, 32, 48, _SIZE):
            drawn.addPixmap(pixmap(kind, size))
        _cache[kind] = drawn
    return _cache[kind]


def pixmap(kind: Kind, size: int = _SIZE) -> QPixmap:
    """``kind``'s picture at ``size`` px square."""
    if kind not in KINDS:
        raise ValueError(f"no icon for {kind!r}")
    picture = QPixmap(size, size)
    picture.fill(Qt.GlobalColor.transparent)
    painter = QPainter(picture)
    try:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.scale(size / _SIZE, size / _SIZE)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(COLOURS[kind]))
        painter.drawEllipse(QRectF(2, 2, 60, 60))
        painter.setBrush(QColor("white"))
        _glyph(painter, kind)
    finally:
        painter.end()
    return picture


def _glyph(painter: QPainter, kind: Kind) -> None:
    if kind == "sharing":  # a dot: on, waiting
        painter.drawEllipse(QRectF(22, 22, 20, 20))
    elif kind == "busy":  # play
        painter.drawPolygon(QPolygonF([QPointF(24, 17), QPointF(48, 32), QPointF(24, 47)]))
    elif kind == "paused":  # two bars
        painter.drawRect(QRectF(20, 18, 9, 28))
        painter.drawRect(QRectF(35, 18, 9, 28))
    elif kind == "offline":  # a dash: nothing to talk to
        painter.drawRect(QRectF(16, 28, 32, 8))
    else:  # error: "!"
        painter.drawRect(QRectF(28, 13, 8, 25))
        painter.drawEllipse(QRectF(27, 43, 10, 10))
