from decode_worker.service import DecodeServicer
from worker.server import main

main("decode", DecodeServicer)
