"""The one-line progress indicator of long bttctl verbs (check-namespace, replay-log): drawn
on stderr only when it is a terminal, and wiped when the verb is done so that its report
starts on a clean line."""
from __future__ import annotations


class ProgressLine:
    def __init__(self, stream):
        self.stream = stream if stream.isatty() else None
        self.width = 0  # the widest line drawn so far: what done() wipes

    def show(self, text: str) -> None:
        if self.stream:
            self.stream.write("\r" + text)
            self.stream.flush()
            self.width = max(self.width, len(text))

    def done(self) -> None:
        if self.stream and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
