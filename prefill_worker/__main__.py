from prefill_worker.service import PrefillServicer
from worker.server import main

main("prefill", PrefillServicer)
