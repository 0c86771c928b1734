#!/bin/bash
# The check: between torch ops, B=1,8(,64) for dpc; B=1,8 tpc and TRA; glibc as-is.
cd /work/main
export PYTHONPATH=/work/main
for isa in avx512 avx2; do
  if [ $isa = avx2 ]; then export HOT_KERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 TORCHINDUCTOR_CACHE_DIR=/tmp/ind_avx2; fi
  for m in HoT-MixSTE HoT-MotionBERT HoT-MotionAGFormer TPC-MixSTE TPC-MHFormer; do
    case $m in
      TPC-*) ops=dpc,tpc;;
      *) ops=dpc,tpc,tra;;
    esac
    python -m hot_kernels bench --ops $ops --sweep B=1,8 --model $m --host-allocator as-is --out /tmp/chk/$isa/$m > /tmp/chk/$isa-$m.log 2>&1
  done
  python -m hot_kernels bench --ops dpc --sweep B=64 --model HoT-MixSTE --host-allocator as-is --out /tmp/chk/$isa/dpc64 > /tmp/chk/$isa-dpc64.log 2>&1
done
echo done > /tmp/chk/DONE
