"""Storage tiers below host memory: G3 local disk and G4 object stores (S3, GCS).

Importable as ``kvbm.storage``. Object-store tiers import their client libraries lazily
(extras ``kvtier[s3]`` and ``kvtier[gcs]``).
"""

from kvbm.storage.base import Capability, PageStore, RemovalReason, TierListener, TierStats
from kvbm.storage.page import HEADER_SIZE, PageFault, make_header, parse_header, verify_page

__all__ = ["HEADER_SIZE", "Capability", "PageFault", "PageStore", "RemovalReason",
           "TierListener", "TierStats", "make_header", "parse_header", "verify_page"]
