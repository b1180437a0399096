# The baseline of `phasekit bench moe`'s "pack vs zipnn" lines: ZipNN (PyPI `zipnn`) compresses
# the assembled bf16 checkpoint file to file and durably, as `phasekit pack` is timed: read,
# compress, write, fsync. Prints "<ratio> <MB/s>". The bench runs it as
#   python3 -c "$(cat zipnn_pack.py)" INPUT OUTPUT
# (it is embedded in the binary with include_str!, src/bench/moe.rs).
import os,sys,time,zipnn
z=zipnn.ZipNN(bytearray_dtype='bfloat16')
os.sync()
t=time.time()
d=open(sys.argv[1],'rb').read()
c=z.compress(d)
f=open(sys.argv[2],'wb');f.write(c);f.flush();os.fsync(f.fileno());f.close()
t=time.time()-t
os.remove(sys.argv[2])
print(len(d)/len(c), len(d)/1e6/t)
