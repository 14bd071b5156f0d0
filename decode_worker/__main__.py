from decode_worker.service import DecodeServicer
from runtime.worker import main

main("decode", DecodeServicer)
