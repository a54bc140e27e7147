//! The seeded rotations of planar, iso and rotor are orthogonal (rotor: a
//! proper rotation from the sandwich product), and deterministic.
use crate::{
    iso::{left_mul, quaternions},
    planar::givens,
    rotation::{tests::assert_orthogonal, Rng},
    rotor::{gp, random_rotor, reverse, rotors, sandwich_matrix},
};

#[test]
fn block_rotations_are_orthogonal() {
    for d in [64, 96, 66, 13] {
        assert_orthogonal(&givens(d, 1), d);
        assert_orthogonal(&quaternions(d, 2), d);
        assert_orthogonal(&rotors(d, 3), d);
    }
}

fn det3(m: &[f32; 9]) -> f32 {
    m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) + m[2] * (m[3] * m[7] - m[4] * m[6])
}

#[test]
fn rotor_sandwich_is_a_proper_rotation() {
    let mut rng = Rng::new(9);
    for _ in 0..20 {
        let r = random_rotor(&mut rng);
        // R R̃ = 1
        let rr = gp(&r, &reverse(&r));
        assert!((rr[0] - 1.0).abs() < 1e-12 && rr[1..].iter().all(|x| x.abs() < 1e-12), "{rr:?}");
        // R v R̃ of a vector is a vector (no scalar, bivector or trivector part)
        let v = [0.0, 0.3, -1.2, 0.0, 0.7, 0.0, 0.0, 0.0];
        let img = gp(&gp(&r, &v), &reverse(&r));
        for blade in [0usize, 3, 5, 6, 7] {
            assert!(img[blade].abs() < 1e-12, "grade leak {blade}: {img:?}");
        }
        let m = sandwich_matrix(&r);
        assert!((det3(&m) - 1.0).abs() < 1e-5);
        // the matrix applied to v equals the sandwich
        for (i, blade) in [1usize, 2, 4].into_iter().enumerate() {
            let mv = m[i * 3] as f64 * 0.3 + m[i * 3 + 1] as f64 * -1.2 + m[i * 3 + 2] as f64 * 0.7;
            assert!((mv - img[blade]).abs() < 1e-6);
        }
    }
}

#[test]
fn quaternion_left_multiplication() {
    // i ⊗ j = k: left_mul(i) maps (0, 0, 1, 0) to (0, 0, 0, 1).
    let m = left_mul([0.0, 1.0, 0.0, 0.0]);
    let col2: Vec<f32> = (0..4).map(|r| m[r * 4 + 2]).collect();
    assert_eq!(col2, vec![0.0, 0.0, 0.0, 1.0]);
}
