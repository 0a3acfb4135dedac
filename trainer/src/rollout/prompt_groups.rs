//! Rows that share a prompt. A group's G samples sit in consecutive rows with the same prompt, and
//! the prompt's keys and values do not depend on what follows it, so rollouts prefill it once and
//! training runs it once per group (the prefix's keys and values are repeated to the group's rows).

/// Runs of consecutive rows with equal prompts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptGroups {
    /// For each row, the index of its group.
    pub group_of_row: Vec<u32>,
    /// For each group, the index of its first row.
    pub first_row: Vec<u32>,
}

impl PromptGroups {
    /// Groups the consecutive equal items of `prompts`.
    pub fn of<T: PartialEq>(prompts: &[T]) -> Self {
        let mut groups = Self { group_of_row: Vec::with_capacity(prompts.len()), first_row: Vec::new() };
        for (row, prompt) in prompts.iter().enumerate() {
            if row == 0 || prompts[row - 1] != *prompt {
                groups.first_row.push(row as u32);
            }
            groups.group_of_row.push(groups.first_row.len() as u32 - 1);
        }
        groups
    }

    /// One group per row: nothing shared.
    pub fn unshared(rows: usize) -> Self {
        Self { group_of_row: (0..rows as u32).collect(), first_row: (0..rows as u32).collect() }
    }

    /// Whether some group has more than one row.
    pub fn shares(&self) -> bool {
        self.first_row.len() < self.group_of_row.len()
    }

    /// Whether these groups describe `prompts`: one entry per row, and every row's prompt equal to
    /// its group's first.
    pub fn fits<T: PartialEq>(&self, prompts: &[T]) -> bool {
        self.group_of_row.len() == prompts.len()
            && self.group_of_row.iter().enumerate().all(|(row, &group)| {
                self.first_row
                    .get(group as usize)
                    .is_some_and(|&first| prompts.get(first as usize) == Some(&prompts[row]))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_equal_prompts_form_a_group() {
        let groups = PromptGroups::of(&["a", "a", "b", "a", "a", "a"]);
        assert_eq!(groups.group_of_row, [0, 0, 1, 2, 2, 2]);
        assert_eq!(groups.first_row, [0, 2, 3]);
        assert!(groups.shares());
        assert!(groups.fits(&["a", "a", "b", "a", "a", "a"]));
        assert!(!groups.fits(&["a", "c", "b", "a", "a", "a"]));
        assert!(!PromptGroups::of(&["a", "b", "a"]).shares());
        assert!(!PromptGroups::unshared(3).shares());
    }
}
