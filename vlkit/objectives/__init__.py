"""Objectives: what a stage optimises and how it is validated (``objective:`` on a stage).

Built-ins: ``lm`` (next-token loss; validation loss + exact-match accuracy of generated answers) and
``distill`` (HoVLE stage I). Third-party objectives come through the ``vlkit.objectives`` entry-point group
or as ``objective: package.module:Class``; see :class:`vlkit.objectives.base.Objective`.
"""
