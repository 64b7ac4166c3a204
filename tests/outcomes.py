"""How tests name the result of a call: (status code name, ErrorInfo reason, expected_step)."""

Outcome = tuple[str, str, str | None]  # (status code name, ErrorInfo reason, expected_step)
OK: Outcome = ("OK", "", None)
BAD: Outcome = ("INVALID_ARGUMENT", "BAD_INPUT", None)
NOT_FOUND: Outcome = ("NOT_FOUND", "SESSION_NOT_FOUND", None)
EXISTS: Outcome = ("ALREADY_EXISTS", "SESSION_EXISTS", None)
