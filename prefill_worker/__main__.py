from prefill_worker.service import PrefillServicer
from runtime.worker import main

main("prefill", PrefillServicer)
