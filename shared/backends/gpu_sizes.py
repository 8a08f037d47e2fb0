"""GPUs per node of Azure's GPU VM sizes: what the seed read from `compute.list_sizes()`.

`list_sizes()` calls `GET /subscriptions/{id}/providers/Microsoft.MachineLearningServices/locations/
{region}/vmSizes`, a subscription-scope read; the app's identity holds roles on the workspace only,
and a subscription-wide role for one number is more than it should have. So the number comes from
this table (GPU counts from Microsoft's VM size pages, learn.microsoft.com/azure/virtual-machines/
sizes/gpu-accelerated/*), or from TUNEDROP_AZUREML_GPUS_PER_NODE for a size it lacks.
Keys are lower case: Azure ML spells sizes in either case ("STANDARD_NC24ADS_A100_V4").
"""

from __future__ import annotations

GPUS_PER_NODE: dict[str, int] = {
    # NCv3 (V100; retired 2025-09-30, kept so an existing cluster still reads right)
    "standard_nc6s_v3": 1, "standard_nc12s_v3": 2, "standard_nc24s_v3": 4, "standard_nc24rs_v3": 4,
    # NCasT4_v3 (T4)
    "standard_nc4as_t4_v3": 1, "standard_nc8as_t4_v3": 1, "standard_nc16as_t4_v3": 1, "standard_nc64as_t4_v3": 4,
    # NC A100 v4
    "standard_nc24ads_a100_v4": 1, "standard_nc48ads_a100_v4": 2, "standard_nc96ads_a100_v4": 4,
    # ND A100 v4 / NDm A100 v4
    "standard_nd96asr_v4": 8, "standard_nd96amsr_a100_v4": 8,
    # NCads H100 v5, ND H100 v5
    "standard_nc40ads_h100_v5": 1, "standard_nc80adis_h100_v5": 2, "standard_nd96isr_h100_v5": 8,
    # NDv2 (V100)
    "standard_nd40rs_v2": 8,
}


def gpus_per_node(vm_size: str) -> int:
    """GPUs of one node of ``vm_size`` (any casing); 0 when the table does not know the size."""
    return GPUS_PER_NODE.get(vm_size.strip().lower(), 0)
