"""Drop-in replacements for other libraries' occlusion explainers, computed
by KQL's incremental engine (``kql.tensor_api``):

- :class:`kql.compat.captum.Occlusion` for ``captum.attr.Occlusion``;
- :class:`kql.compat.monai.OcclusionSensitivity` for
  ``monai.visualize.OcclusionSensitivity``.

Neither needs the library it replaces to be installed.
"""
