"""The error a curation stage raises for a problem the user can fix (bad input, a guardrail tripped).

``dinov2-curate`` prints it as one line, ``dinov2-curate: error: …``, and exits with status 2; a stage
raises it before writing anything, so the work directory is left as it was (see
:func:`data_curation.workdir.run_stage`).
"""

from __future__ import annotations


class CurationError(RuntimeError):
    """A one-line, actionable message about the input or the settings of a stage."""
