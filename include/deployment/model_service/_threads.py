"""One model thread per service process; pods scale out instead.

Imported first by ``model_service.app``, before any module that loads numpy, pandas or scikit-learn:
their OpenMP and BLAS runtimes read ``OMP_NUM_THREADS`` once, when they load. Kept out of the
package's ``__init__`` so the pipeline steps (``model_service.cli``) and the processes that merely
import a helper module (tests, the bench) keep their own thread settings and pass nothing on.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
