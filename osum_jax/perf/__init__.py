"""What the compilers say about a train step: AOT compiles for TPU/GPU targets (``aot``), the optimized-HLO
analysis (``hlo``), the ``--plan`` memory estimate and recipe proposals (``plan``), GPU target specs
(``gpu_targets``), and ``osum-train --plan`` itself (``cli``). Imports train to build the step; train never
imports perf (an import-linter contract)."""
