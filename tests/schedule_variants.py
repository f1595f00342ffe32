"""Every built-in schedule variant, shared by the schedule and simulator tests."""

# (schedule name, virtual stages, split backward)
VARIANTS: list[tuple[str, int, bool]] = [
    ("1f1b", 1, True),
    ("gpipe", 1, True),
    ("interleaved-1f1b", 1, True),
    ("interleaved-1f1b", 2, True),
    ("interleaved-1f1b", 3, True),
    ("zero-bubble", 1, True),
    ("zero-bubble", 1, False),
    ("zero-bubble", 2, True),
    ("zero-bubble", 2, False),
    ("zero-bubble", 3, True),
    ("zero-bubble", 3, False),
]
