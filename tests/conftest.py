import os

import torch

# Deterministic, small and quiet: tests run on 2 CPU cores.
torch.set_num_threads(int(os.environ.get("OCULA_TEST_THREADS", "1")))
torch.manual_seed(0)
