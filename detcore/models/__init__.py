"""Dense detectors of the GFL family: backbones, FPN, head and the assembled detector.

Import what you need from the submodules: `detcore.models.gfl` (``build_detector``,
``DetectorConfig``, ``GFLDetector``), `detcore.models.backbones`, `detcore.models.fpn`,
`detcore.models.head`.
"""
