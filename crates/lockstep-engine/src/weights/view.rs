//! Views into part of a tensor: the experts of a fused mixture-of-experts tensor
//! (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) as 2-D matrices, without
//! copying.

use super::Tensor;

impl Tensor {
    /// The `rows` × `cols` matrix whose first element is element `first` of this tensor
    /// (row-major), sharing its bytes; `None` when it does not lie inside the tensor.
    pub fn matrix_view(&self, first: usize, rows: usize, cols: usize) -> Option<Tensor> {
        // Block dtypes: the view must start on a block and hold rows of whole blocks.
        let start = self.start.checked_add(self.dtype.bytes_for(first)?)?;
        let row = self.dtype.bytes_for(cols)?;
        let end = start.checked_add(rows.checked_mul(row)?)?;
        (end <= self.end).then(|| Tensor {
            storage: self.storage.clone(),
            start,
            end,
            dtype: self.dtype,
            shape: vec![rows, cols],
            q8_dot: self.q8_dot,
            // A view is its own matrix: its own coding, if one is made.
            coded: Default::default(),
            bf16_copy: Default::default(),
            coding_replaces: Default::default(),
            decoded: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::StoredDtype;

    #[test]
    fn views_address_the_right_elements() {
        let vals: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::from_bytes(StoredDtype::F32, vec![2, 3, 4], bytes);
        let v = t.matrix_view(12 + 4, 2, 4).unwrap();
        assert_eq!(v.shape, [2, 4]);
        let got: Vec<f32> = v
            .bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, (16..24).map(|x| x as f32).collect::<Vec<_>>());
        assert!(t.matrix_view(20, 2, 4).is_none());
        assert!(t.matrix_view(usize::MAX, 2, 4).is_none());
    }
}
