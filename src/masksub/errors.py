"""One exception type, so callers can catch every masksub input error at once."""


class MaskSubError(ValueError):
    """Bad input to masksub: the message says what was wrong and what to do."""


def check_ratio(ratio: float, what: str = "ratio", *, allow_zero: bool = True) -> float:
    """Ratios, dropout and drop-path rates all live in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise MaskSubError(f"{what} must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__})")
    ratio = float(ratio)
    if not (0.0 <= ratio < 1.0) or (ratio == 0.0 and not allow_zero):
        lo = "[0, 1)" if allow_zero else "(0, 1)"
        raise MaskSubError(f"{what} must be in {lo}, got {ratio:.6g}; e.g. 0.5 for masking, 0.2 for dropout, 0.1 for drop-path")
    return ratio
