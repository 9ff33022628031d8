"""A pickle payload for tests that prove a loader never unpickles."""


class PicklePayload:
    """Unpickling this creates the file `flag`: proof that a pickle ran."""

    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))
