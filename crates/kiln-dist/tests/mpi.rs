//! The MPI engine across two real processes: this test binary runs itself under
//! `mpirun -np 2` (the `worker` test, ignored unless launched so), and each rank checks every
//! collective's result against what the other rank contributed. Then a stalled rank: a
//! collective that one rank never joins ends with a timeout naming that rank.
#![cfg(feature = "mpi")]

use std::process::Command;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use kiln_dist::{shard_sizes, Collectives, DistError, MpiCollectives};

fn mpirun(test: &str, extra_env: &[(&str, &str)]) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", "2", "--oversubscribe"])
        .arg(exe)
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_MPI_WORKER", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output()
        .expect("mpirun (apt-get install openmpi-bin: scripts/install-mpi.sh)")
}

#[test]
fn collectives_agree_across_two_ranks() {
    let out = mpirun("worker_collectives", &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("rank ok").count(), 2, "{text}");
}

#[test]
fn a_stalled_rank_is_named_after_the_timeout() {
    let t0 = std::time::Instant::now();
    let out = mpirun("worker_stall", &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "rank 0: all_reduce #1 did not complete within 2 s; rank 1 is not responding"
        ),
        "{text}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{text}");
}

fn worker() -> Option<MpiCollectives> {
    if std::env::var("KILN_MPI_WORKER").is_err() {
        return None; // run by `cargo test --ignored` outside mpirun: nothing to do
    }
    Some(MpiCollectives::init(Duration::from_secs(2)).unwrap())
}

#[test]
#[ignore = "run under mpirun by collectives_agree_across_two_ranks"]
fn worker_collectives() {
    let Some(c) = worker() else { return };
    let (rank, dev) = (c.rank() as f32, Device::Cpu);
    assert_eq!(c.world_size(), 2);
    // all-reduce: [r, 10 r + 1, ...] summed over r = 0, 1.
    let t = Tensor::new(&[rank, 10.0 * rank + 1.0, 5.0], &dev).unwrap();
    c.all_reduce_sum(&t).unwrap();
    assert_eq!(t.to_vec1::<f32>().unwrap(), vec![1.0, 12.0, 10.0]);
    // reduce-scatter of 5 elements in chunks [3, 2].
    let chunks = shard_sizes(5, 2);
    let input = Tensor::new(&[1f32, 2., 3., 4., 5.], &dev)
        .unwrap()
        .affine(1.0 + rank as f64, 0.0)
        .unwrap();
    let out = Tensor::zeros(chunks[c.rank()], DType::F32, &dev).unwrap();
    c.reduce_scatter_sum(&input, &out, &chunks).unwrap();
    let want: Vec<f32> = if c.rank() == 0 {
        vec![3., 6., 9.]
    } else {
        vec![12., 15.]
    };
    assert_eq!(out.to_vec1::<f32>().unwrap(), want);
    // all-gather back, and in place (a view of a larger buffer).
    let full = Tensor::zeros(5, DType::F32, &dev).unwrap();
    c.all_gather(&out, &full, &chunks).unwrap();
    assert_eq!(full.to_vec1::<f32>().unwrap(), vec![3., 6., 9., 12., 15.]);
    // bf16 (FSDP's compute parameters) into a view: 16-bit words, bit for bit.
    let halves = Tensor::zeros(7, DType::BF16, &dev).unwrap();
    let mine = Tensor::new(&[1.0f32 / 3.0 + rank; 3][..chunks[c.rank()]], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    c.all_gather(&mine, &halves.narrow(0, 1, 5).unwrap(), &chunks)
        .unwrap();
    let third = half::bf16::from_f32(1.0 / 3.0);
    let four_thirds = half::bf16::from_f32(4.0 / 3.0);
    let zero = half::bf16::ZERO;
    assert_eq!(
        halves.to_vec1::<half::bf16>().unwrap(),
        vec![zero, third, third, third, four_thirds, four_thirds, zero]
    );
    let big = Tensor::zeros(7, DType::F32, &dev).unwrap();
    let view = big.narrow(0, 2, 5).unwrap();
    let mine = Tensor::new(&[rank + 1.0; 3][..chunks[c.rank()]], &dev).unwrap();
    let start = if c.rank() == 0 { 0 } else { 3 };
    view.slice_set(&mine, 0, start).unwrap();
    c.all_gather_in_place(&view, &chunks).unwrap();
    assert_eq!(
        big.to_vec1::<f32>().unwrap(),
        vec![0., 0., 1., 1., 1., 2., 2.]
    );
    // broadcasts and scalars.
    let b = Tensor::new(&[rank; 4], &dev).unwrap();
    c.broadcast(&b, 1).unwrap();
    assert_eq!(b.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
    let mut bytes = if c.rank() == 0 {
        b"manifest".to_vec()
    } else {
        vec![]
    };
    c.broadcast_bytes(&mut bytes, 0).unwrap();
    assert_eq!(bytes, b"manifest");
    let mut v = [rank as f64 + 0.5, 2.0];
    c.all_reduce_sum_f64(&mut v).unwrap();
    assert_eq!(v, [2.0, 4.0]);
    let mut m = [rank as f64];
    c.all_reduce_max_f64(&mut m).unwrap();
    assert_eq!(m, [1.0]);
    c.barrier().unwrap();
    println!("rank ok");
}

#[test]
#[ignore = "run under mpirun by a_stalled_rank_is_named_after_the_timeout"]
fn worker_stall() {
    let Some(c) = worker() else { return };
    let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    c.all_reduce_sum(&t).unwrap(); // #0: both ranks
    if c.rank() == 1 {
        std::thread::sleep(Duration::from_secs(120)); // stalls: never joins #1
    }
    match c.all_reduce_sum(&t) {
        Err(e @ DistError::Timeout { .. }) => {
            eprintln!("kiln: {e}");
            c.abort(3)
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}
