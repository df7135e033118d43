#!/bin/bash
# GPU checks of openmm_flowmatch on the lent machine: stack, gpu tests, native CUDA kernel, speed, production run.
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s); stamp() { echo "=== $(( $(date +%s) - t0 )) s: $*"; }
S=/tmp/site
install() { rm -rf $S; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S "$@" && cp -r .gpu/pdbfixer $S/; }
common=".whl/acellera*.whl .whl/deeptime*.whl .whl/mdtraj*.whl .whl/zuko*.whl"
install $common .whl852/*.whl
export PYTHONPATH=$S:$PWD
# openmmtorch's plugins link libtorch.so; with the wheels in another prefix than torch, name torch's lib folder
export LD_LIBRARY_PATH=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))'):$LD_LIBRARY_PATH
stack=8.5.2
if ! python3 .gpu/stack_check.py > /tmp/stack.txt 2>&1; then
  echo "--- openmm 8.5.2 stack failed:"; cat /tmp/stack.txt
  install $common .whl/openmm-*.whl .whl/openmm_cuda*.whl; stack=8.6.1
  python3 .gpu/stack_check.py >> /tmp/stack.txt 2>&1 || echo "--- openmm 8.6.1 stack check failed too"
fi
cat /tmp/stack.txt; stamp "stack $stack"
echo "CXX=$CXX"; ${CXX:-c++} --version | head -1; echo | ${CXX:-c++} -x c++ -E -dM - | grep -i "GLIBCXX_USE_CXX11_ABI\|__GNUC__ "; echo '#include <string>' | ${CXX:-c++} -x c++ -E -dM - | grep "_GLIBCXX_USE_CXX11_ABI"
python3 -m openmm_flowmatch.native build 2>&1 | tail -2; python3 -c "from openmm_flowmatch.native import native_platforms, gpu_unavailable_reasons; print('native platforms', native_platforms(), gpu_unavailable_reasons())"
stamp "native built"
timeout 90 python3 -m pytest -p no:cacheprovider --continue-on-collection-errors -m gpu tests --timeout 80 -rfEs -v > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc $?"; tail -25 $OUT/gpu_tests.txt | cut -c1-200
stamp "gpu tests"
timeout 90 python3 -m pytest -p no:cacheprovider -n 8 tests/test_native.py tests/test_export.py tests/test_torchforce_stack.py --timeout 80 -rfE > $OUT/native_tests.txt 2>&1; echo "native tests rc $?"; tail -15 $OUT/native_tests.txt | cut -c1-200
stamp "native/export tests"
sim() { timeout 45 python3 -m openmm_flowmatch.cli simulate --quiet --debug .gpu/flm_100k_seed0.pt openmm_flowmatch/resources/alanine_dipeptide.pdb --out /tmp/$1 --replicas 1000 --start-from .gpu/starts_1000.h5 --time-step 0.004 --report-interval 250 --platform CUDA --seed 1 --backend $1 --steps $2 > /tmp/sim_$1.txt 2>&1; echo "sim $1 rc $?"; tail -8 /tmp/sim_$1.txt | cut -c1-300; cp /tmp/$1/simulation.json $OUT/sim_$1.json; }
sim native 27500; stamp "production run native"
tar czf $OUT/sim_native.tgz --exclude "*.chk" -C /tmp native
sim torchforce 5000; stamp "production run torchforce"
timeout 80 python3 benchmarks/bench_cg_md.py --platform CUDA --replicas 1 100 1000 10000 --backends torchforce native --seconds 1.5 --repeats 1 --output $OUT/cg_md_speed_cuda.json > $OUT/bench.txt 2>&1; echo "bench rc $?"; grep -v "^W1\|Warning" $OUT/bench.txt | tail -12 | cut -c1-200
stamp "bench done"
ls -la $OUT
